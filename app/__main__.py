"""`python -m djinnsim`: the same entry as the `djinnsim` command."""

from djinnsim.main import main

main()
