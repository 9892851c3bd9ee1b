"""`python -m djinnsim`: the same command as `djinnsim`."""

from djinnsim.cli import app

app(prog_name="djinnsim")
