"""fusedlstm: a drop-in `keras.layers.LSTM` whose recurrence runs in one fused Numba kernel."""

from fusedlstm.quiet_start import quiet_framework_start

with quiet_framework_start():  # does nothing unless this process is `python -m fusedlstm`
    from fusedlstm.layer import LSTM

__version__ = "0.1.0"
__all__ = ["LSTM"]
