"""`python -m lorafit` is the `lorafit` command, so `torchrun -m lorafit` and `accelerate launch -m lorafit` work."""

from lorafit.cli import app

app(prog_name="lorafit")
