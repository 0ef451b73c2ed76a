"""`python -m lorafit.cli` is the `lorafit` command too."""

from lorafit.cli import app

app(prog_name="lorafit")
