"""`python -m fusedlstm`: see `fusedlstm.cli`."""

import sys

from fusedlstm.cli import main

sys.stdout.reconfigure(line_buffering=True)  # our lines stay in order with stderr's in a pipe
sys.exit(main())
