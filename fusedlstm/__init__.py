"""fusedlstm: a drop-in `keras.layers.LSTM` whose recurrence runs in one fused Numba kernel."""

from fusedlstm.layer import LSTM

__version__ = "0.1.0"
__all__ = ["LSTM"]
