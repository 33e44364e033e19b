"""`python -m fusedlstm`: see `fusedlstm.cli`."""

import sys

from fusedlstm.cli import main

sys.exit(main())
