"""`python -m fusedlstm`: everything only the command line uses.

`main` parses the subcommands (`check`, `compile`, `demo`, `explain`); the
other modules each serve one of them. `import fusedlstm` imports none of this.
"""
