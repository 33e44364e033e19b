"""`python -m fusedlstm`: see `fusedlstm.cli.main`."""

import sys

from fusedlstm.cli.quiet_start import quiet_framework_start

with quiet_framework_start():
    import fusedlstm.convert  # noqa: F401  (the layer, registered with Keras)

from fusedlstm.cli.main import main  # noqa: E402

sys.stdout.reconfigure(line_buffering=True)  # our lines stay in order with stderr's in a pipe
sys.exit(main())
