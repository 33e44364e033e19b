"""Shape, dtype and contiguity checks of the kernels' host drivers (CPU and CUDA).

The kernels read their inputs with Numba's bounds checks off: an array one row
short is read past its end, silently. So every driver checks every input
against the sequence shape before it launches anything:

    N, T, H = check_forward(xw, recurrent_kernel, h0, c0, mask, recurrent_mask)
    N, T, H = check_backward(recurrent_kernel, mask, recurrent_mask, saved,
                             d_outputs, d_h_n, d_c_n)
    N, T, C, H = check_layer_forward(x, kernel, bias, recurrent_kernel, h0, c0, mask,
                                     input_mask, recurrent_mask)
    N, T, C, H = check_layer_backward(x, kernel, recurrent_kernel, mask, input_mask,
                                      recurrent_mask, saved, d_outputs, d_h_n, d_c_n)

The first two check the CUDA drivers' inputs (the projection `xw` computed by
the framework), the last two the CPU drivers' (the inputs `x` and the weights).

Each raises a `ValueError` naming the argument, what was expected and what was
received. The arrays may be NumPy arrays or device arrays (anything with
`shape` and `dtype`: Numba device arrays, torch tensors); contiguity is read
from `flags` or `__cuda_array_interface__` where the array has them. Pass
`contiguous=False` where the driver copies its inputs into its own layout
anyway. NumPy only: this module imports no framework and no Numba.
"""

import numpy as np

__all__ = ["check_backward", "check_forward", "check_layer_backward", "check_layer_forward"]


_NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bool": np.dtype(np.bool_)}

def check_forward(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, contiguous=True):
    """Checks the forward drivers' inputs; returns `(N, T, H)`.

    Expected: `xw` [N, T, 4H] float32 (H >= 1), `recurrent_kernel` [H, 4H],
    `h0` and `c0` [N, H] float32, `mask` [N, T] bool or None,
    `recurrent_mask` [4, N, H] float32 or None.

    Raises:
        ValueError: naming the first argument that does not match.
    """
    N, T, H = _sequence_shape("xw", xw, 4, contiguous)
    dims = _dims(N, T, H, "xw", xw)
    _check("recurrent_kernel", recurrent_kernel, (H, 4 * H), "[H, 4H]", "float32", dims,
           contiguous)
    _check("h0", h0, (N, H), "[N, H]", "float32", dims, contiguous)
    _check("c0", c0, (N, H), "[N, H]", "float32", dims, contiguous)
    _check_masks(mask, recurrent_mask, N, T, H, dims, contiguous)
    return N, T, H


def check_backward(recurrent_kernel, mask, recurrent_mask, saved, d_outputs, d_h_n, d_c_n,
                   contiguous=True):
    """Checks the backward drivers' inputs; returns `(N, T, H)`.

    Expected: `d_outputs` [N, T, H] float32 (H >= 1), `d_h_n` and `d_c_n`
    [N, H], `recurrent_kernel` [H, 4H], `saved = (h_in, c_seq, gates)` as
    returned by `forward(..., training=True)`: `h_in` [N, T, H] or None (the
    CUDA drivers do not read it), `c_seq` [N, T+1, H], `gates` [N, T, 4H];
    `mask` and `recurrent_mask` as for `check_forward`.

    Raises:
        ValueError: naming the first argument that does not match.
    """
    N, T, H = _sequence_shape("d_outputs", d_outputs, 1, contiguous)
    dims = _dims(N, T, H, "d_outputs", d_outputs)
    _check("d_h_n", d_h_n, (N, H), "[N, H]", "float32", dims, contiguous)
    _check("d_c_n", d_c_n, (N, H), "[N, H]", "float32", dims, contiguous)
    _check("recurrent_kernel", recurrent_kernel, (H, 4 * H), "[H, 4H]", "float32", dims,
           contiguous)
    h_in, c_seq, gates = _saved(saved)
    if h_in is not None:
        _check("saved h_in", h_in, (N, T, H), "[N, T, H]", "float32", dims, contiguous)
    _check("saved c_seq", c_seq, (N, T + 1, H), "[N, T+1, H]", "float32", dims, contiguous)
    _check("saved gates", gates, (N, T, 4 * H), "[N, T, 4H]", "float32", dims, contiguous)
    _check_masks(mask, recurrent_mask, N, T, H, dims, contiguous)
    return N, T, H


def check_layer_forward(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask,
                        recurrent_mask, contiguous=True):
    """Checks the inputs of the forward drivers that own the projection; returns
    `(N, T, C, H)`.

    Expected: `x` [N, T, C] float32 (C >= 1), `recurrent_kernel` [H, 4H] (H >= 1),
    `kernel` [C, 4H], `bias` [4H], `h0` and `c0` [N, H] float32, `mask` [N, T]
    bool or None, `input_mask` [4, N, C] and `recurrent_mask` [4, N, H] float32
    or None.

    Raises:
        ValueError: naming the first argument that does not match.
    """
    N, T, C, H, dims = _layer_shape(x, recurrent_kernel, contiguous)
    _check("kernel", kernel, (C, 4 * H), "[C, 4H]", "float32", dims, contiguous)
    _check("bias", bias, (4 * H,), "[4H]", "float32", dims, contiguous)
    _check("h0", h0, (N, H), "[N, H]", "float32", dims, contiguous)
    _check("c0", c0, (N, H), "[N, H]", "float32", dims, contiguous)
    _check_masks(mask, recurrent_mask, N, T, H, dims, contiguous)
    _check_input_mask(input_mask, N, C, dims, contiguous)
    return N, T, C, H


def check_layer_backward(x, kernel, recurrent_kernel, mask, input_mask, recurrent_mask, saved,
                         d_outputs, d_h_n, d_c_n, contiguous=True):
    """Checks the inputs of the backward drivers that own the weight gradients; returns
    `(N, T, C, H)`.

    Expected: `x`, `kernel`, `recurrent_kernel` and the masks as for
    `check_layer_forward`; `saved = (h_in, c_seq, gates)` as returned by
    `forward(..., training=True)`: `h_in` [N, T, H], `c_seq` [N, T+1, H], `gates`
    [N, T, 4H]; `d_outputs` [N, T, H], `d_h_n` and `d_c_n` [N, H] float32.

    Raises:
        ValueError: naming the first argument that does not match.
    """
    N, T, C, H, dims = _layer_shape(x, recurrent_kernel, contiguous)
    _check("kernel", kernel, (C, 4 * H), "[C, 4H]", "float32", dims, contiguous)
    _check("d_outputs", d_outputs, (N, T, H), "[N, T, H]", "float32", dims, contiguous)
    _check("d_h_n", d_h_n, (N, H), "[N, H]", "float32", dims, contiguous)
    _check("d_c_n", d_c_n, (N, H), "[N, H]", "float32", dims, contiguous)
    h_in, c_seq, gates = _saved(saved)
    _check("saved h_in", h_in, (N, T, H), "[N, T, H]", "float32", dims, contiguous)
    _check("saved c_seq", c_seq, (N, T + 1, H), "[N, T+1, H]", "float32", dims, contiguous)
    _check("saved gates", gates, (N, T, 4 * H), "[N, T, 4H]", "float32", dims, contiguous)
    _check_masks(mask, recurrent_mask, N, T, H, dims, contiguous)
    _check_input_mask(input_mask, N, C, dims, contiguous)
    return N, T, C, H


def _layer_shape(x, recurrent_kernel, contiguous):
    """`(N, T, C, H, dims)` from `x` [N, T, C] and `recurrent_kernel` [H, 4H]."""
    shape = _shape(x)
    if len(shape) != 3 or shape[2] == 0:
        raise ValueError(
            f"Expected `x` of shape [N, T, C] with C >= 1. Received: x.shape={shape}")
    _check_dtype_and_layout("x", x, "float32", contiguous)
    N, T, C = shape
    rk_shape = _shape(recurrent_kernel)
    if len(rk_shape) != 2 or rk_shape[0] == 0 or rk_shape[1] != 4 * rk_shape[0]:
        raise ValueError(
            "Expected `recurrent_kernel` of shape [H, 4H] with H >= 1. Received: "
            f"recurrent_kernel.shape={rk_shape}")
    _check_dtype_and_layout("recurrent_kernel", recurrent_kernel, "float32", contiguous)
    H = rk_shape[0]
    dims = f"N={N}, T={T}, C={C} from x.shape={shape}, H={H} from recurrent_kernel.shape={rk_shape}"
    return N, T, C, H, dims


def _saved(saved):
    if not isinstance(saved, (tuple, list)) or len(saved) != 3:
        raise ValueError(
            "Expected `saved` to be the (h_in, c_seq, gates) returned by "
            f"forward(..., training=True). Received: {type(saved).__name__} "
            f"of length {len(saved) if hasattr(saved, '__len__') else 'unknown'}")
    return saved


def _check_input_mask(input_mask, N, C, dims, contiguous):
    if input_mask is not None:
        _check("input_mask", input_mask, (4, N, C), "[4, N, C]", "float32", dims, contiguous)


def _check_masks(mask, recurrent_mask, N, T, H, dims, contiguous):
    if mask is not None:
        _check("mask", mask, (N, T), "[N, T]", "bool", dims, contiguous)
    if recurrent_mask is not None:
        _check("recurrent_mask", recurrent_mask, (4, N, H), "[4, N, H]", "float32", dims,
               contiguous)


def _sequence_shape(name, array, gate_factor, contiguous):
    """`(N, T, H)` of a batch-major [N, T, gate_factor * H] float32 array."""
    shape = _shape(array)
    layout = "[N, T, 4H]" if gate_factor == 4 else "[N, T, H]"
    if len(shape) != 3 or shape[2] == 0 or shape[2] % gate_factor:
        raise ValueError(
            f"Expected `{name}` of shape {layout} with H >= 1. Received: "
            f"{name}.shape={shape}")
    _check_dtype_and_layout(name, array, "float32", contiguous)
    return shape[0], shape[1], shape[2] // gate_factor


def _dims(N, T, H, name, array):
    return f"N={N}, T={T}, H={H} from {name}.shape={_shape(array)}"


def _check(name, array, expected, layout, dtype, dims, contiguous):
    shape = _shape(array)
    if shape != tuple(expected):
        raise ValueError(
            f"Expected `{name}` of shape {layout} = {tuple(expected)} ({dims}). "
            f"Received: {name}.shape={shape}")
    _check_dtype_and_layout(name, array, dtype, contiguous)


def _check_dtype_and_layout(name, array, dtype, contiguous):
    if type(array) is np.ndarray:  # the CPU drivers' case, on every call: without the lookups
        if array.dtype == _NUMPY_DTYPES[dtype] and (array.flags.c_contiguous or not contiguous):
            return
    received = _dtype_name(array)
    if received != dtype:
        raise ValueError(f"Expected `{name}` of dtype {dtype}. Received: {name}.dtype={received}")
    if contiguous and not _c_contiguous(array):
        raise ValueError(
            f"Expected `{name}` to be C-contiguous (row-major, dense). Received: an array "
            f"of shape {_shape(array)} with strides {_strides(array)}")


def _shape(array):
    if type(array) is np.ndarray:
        return array.shape
    return tuple(int(d) for d in array.shape)


def _dtype_name(array):
    dtype = getattr(array, "dtype", None)
    try:
        return np.dtype(dtype).name
    except TypeError:  # a framework's dtype object, e.g. torch.float32
        return str(dtype).rsplit(".", 1)[-1]


def _c_contiguous(array):
    flags = getattr(array, "flags", None)
    if flags is not None:
        try:
            return bool(flags["C_CONTIGUOUS"])
        except (KeyError, TypeError, IndexError):
            pass
    is_contiguous = getattr(array, "is_contiguous", None)  # torch
    if callable(is_contiguous):
        return bool(is_contiguous())
    interface = getattr(array, "__cuda_array_interface__", None)
    if interface is not None:
        strides = interface.get("strides")
        return strides is None or _dense(_shape(array), tuple(strides),
                                         np.dtype(interface["typestr"]).itemsize)
    return True


def _dense(shape, strides, itemsize):
    """Whether `strides` are row-major dense for `shape` (axes of length 1, and
    arrays with no elements, may carry any stride, as in NumPy)."""
    if 0 in shape:
        return True
    step = itemsize
    for d, stride in zip(reversed(shape), reversed(strides)):
        if d > 1 and stride != step:
            return False
        step *= d
    return True


def _strides(array):
    strides = getattr(array, "strides", None)
    if callable(strides):
        strides = strides()
    return None if strides is None else tuple(strides)
