"""fusedlstm: a drop-in `keras.layers.LSTM` whose recurrence runs in one fused Numba kernel.

`fusedlstm.LSTM` is the layer; `fusedlstm.convert` converts models both ways
and exports them.
"""

import importlib
import sys

__version__ = "0.1.0"
__all__ = ["LSTM", "convert"]



def __getattr__(name):
    if name == "LSTM":
        return importlib.import_module("fusedlstm.layer").LSTM
    if name == "convert":
        return importlib.import_module("fusedlstm.convert")
    raise AttributeError(f"module 'fusedlstm' has no attribute {name!r}")


# While `python -m fusedlstm` imports this package, `sys.argv[0]` is "-m": the
# command line imports the library itself, after quieting the frameworks'
# start-up logging (`fusedlstm.cli.quiet_start`). Everywhere else the layer is
# imported (and registered with Keras, for loading saved models) right away.
if sys.argv[:1] != ["-m"]:
    from fusedlstm import convert  # noqa: E402
    from fusedlstm.layer import LSTM  # noqa: E402
