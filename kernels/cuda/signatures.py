"""The launch signatures of every CUDA kernel, for compiling them offline.

`SIGNATURES` maps each kernel name to the Numba signatures the host drivers
launch it with; `kernel_by_name` builds the kernel of a name.
"""

from numba import types

from ..gates import SIGMOID, TANH
from .factory import kernels_for, swap_leading_axes


def _array(ndim, dtype=types.float32):
    return types.Array(dtype, ndim, "C")


_I64, _BOOL = types.int64, types.boolean
LAUNCH_TYPES = (_I64, _I64)  # units, weight_floats
FORWARD_SIGNATURE = LAUNCH_TYPES + (
    _array(3), _array(2), _array(1), _array(2), _array(2), _array(2, _BOOL), _array(3), _BOOL,
    _array(3), _array(2), _array(2), _array(3), _array(3), _array(3), _array(3))
BACKWARD_SIGNATURE = LAUNCH_TYPES + (
    _array(2), _array(1), _array(2, _BOOL), _array(3), _BOOL, _array(3), _array(3), _array(3),
    _array(2), _array(2), _array(3), _array(2), _array(2), _array(2))

# Kernel name -> the Numba signatures the host drivers launch it with (the
# kernels of `kernels_for(TANH, SIGMOID)`: the stock Keras activations, 32
# lanes, the drivers' default; `_dropout` names the recurrent-dropout build).
DROPOUT_SUFFIX = "_dropout"
SIGNATURES = {
    "lstm_forward_persistent": (FORWARD_SIGNATURE,),
    "lstm_forward_persistent" + DROPOUT_SUFFIX: (FORWARD_SIGNATURE,),
    "lstm_forward_block": (FORWARD_SIGNATURE,),
    "lstm_forward_step": ((_I64,) + FORWARD_SIGNATURE,),
    "lstm_backward_persistent": (BACKWARD_SIGNATURE,),
    "lstm_backward_persistent" + DROPOUT_SUFFIX: (BACKWARD_SIGNATURE,),
    "lstm_backward_block": (BACKWARD_SIGNATURE,),
    "lstm_backward_step": ((_I64,) + BACKWARD_SIGNATURE,),
    "swap_leading_axes": ((_array(3), _array(3)), (_array(3, _BOOL), _array(3, _BOOL))),
}


def kernel_by_name(name, activation=TANH, recurrent_activation=SIGMOID):
    """The kernel called `name` in `SIGNATURES`, for one activation pair."""
    if name not in SIGNATURES:
        raise ValueError(f"name must be one of {sorted(SIGNATURES)}; received {name!r}.")
    if name == "swap_leading_axes":
        return swap_leading_axes
    dropout = name.endswith(DROPOUT_SUFFIX)
    kernels = kernels_for(activation, recurrent_activation, dropout=dropout)
    return getattr(kernels, name[:-len(DROPOUT_SUFFIX)] if dropout else name)
