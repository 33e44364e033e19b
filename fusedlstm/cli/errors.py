"""The error type of the command line, at the bottom of the import graph.

Every module of `python -m fusedlstm` raises `CliError` for a mistake the user
can fix; `fusedlstm.cli` prints it as one line and exits with `USAGE_ERROR`.
This module imports nothing, so any module may import it.
"""

USAGE_ERROR = 2


class CliError(Exception):
    """A mistake the user can fix; printed as one line, without a traceback."""
