"""`python -m lorafit` is the `lorafit` command, so `torchrun -m lorafit` and `accelerate launch -m lorafit` work."""

import signal
import sys

# First of all: a SIGTERM while the libraries load stops the command as Ctrl-C does (one line, exit 130).
signal.signal(signal.SIGTERM, signal.default_int_handler)
try:
    from lorafit.cli import app
except KeyboardInterrupt:
    sys.stderr.write("stopped by a signal; nothing was written\n")
    sys.exit(130)

app(prog_name="lorafit")
