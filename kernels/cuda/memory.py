"""Device-memory interop of the CUDA drivers: inputs to device arrays, results back.

Accepted inputs: NumPy arrays (copied to the device), anything with
`__cuda_array_interface__` (PyTorch CUDA tensors, Numba device arrays), a
`StridedMemoryView`, or a CUDA DLPack capsule provider (used in place).
Streams are Numba streams or integer handles. Scratch buffers are kept per
device, stream and name and reused.
"""

import numpy as np
from cuda.core.utils import StridedMemoryView
from numba import cuda

from .device import SIMULATED
from .factory import swap_leading_axes

_DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged
# Threads and blocks of `swap_leading_axes`. The simulator runs each thread as a
# Python thread and the blocks one after another: few of both there.
_SWAP_THREADS = 8 if SIMULATED else 256
_SWAP_MAX_BLOCKS = 4 if SIMULATED else 1024
_SCRATCH = {}


def scratch(name, shape, dtype, stream):
    """A device buffer kept per device, stream and name, reused while its shape fits.

    Calls on one stream run in order, so a buffer never serves two kernels at
    once; calls on other streams get their own.
    """
    key = (_device_id(), _stream_key(stream), name)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
        buffer = _SCRATCH[key] = cuda.device_array(shape, dtype, stream=stream)
    return buffer


def _device_id():
    return 0 if SIMULATED else cuda.get_current_device().id


def _stream_key(stream):
    handle = getattr(stream, "handle", None)
    return int(getattr(handle, "value", handle) or 0)


def as_stream(stream):
    """A Numba stream for None (the default stream), an integer handle or a stream."""
    if stream is None or (isinstance(stream, int) and stream == 0):
        return cuda.default_stream()
    if isinstance(stream, int):
        return cuda.external_stream(stream)
    return stream


def is_device_array(array):
    """Whether `array` lives on a CUDA device (any of the accepted device kinds)."""
    if cuda.devicearray.is_cuda_ndarray(array) or hasattr(array, "__cuda_array_interface__"):
        return True
    if isinstance(array, StridedMemoryView):
        return bool(array.is_device_accessible)
    dlpack_device = getattr(array, "__dlpack_device__", None)
    return dlpack_device is not None and dlpack_device()[0] in _DLPACK_CUDA_DEVICES


def device_view(array):
    """A Numba device array over the memory of any supported device array."""
    if cuda.devicearray.is_cuda_ndarray(array):
        return array
    if hasattr(array, "__cuda_array_interface__"):
        return cuda.as_cuda_array(array, sync=False)
    view = array if isinstance(array, StridedMemoryView) else StridedMemoryView.from_dlpack(
        array, stream_ptr=None)
    itemsize = np.dtype(view.dtype).itemsize
    strides = None if view.strides is None else tuple(s * itemsize for s in view.strides)
    interface = {"shape": tuple(view.shape), "strides": strides,
                 "typestr": np.dtype(view.dtype).str, "data": (view.ptr, view.readonly),
                 "version": 3}
    return cuda.from_cuda_array_interface(interface, owner=view, sync=False)


def to_device(array, name, shape, dtype, stream):
    """Validates `array` and returns it as a C-contiguous device array.

    NumPy (or array-like) inputs are cast and copied; device inputs are used in
    place and must already have the right dtype and layout.
    """
    if is_device_array(array):
        array = device_view(array)
        if array.dtype != dtype:
            raise ValueError(f"{name} must be {np.dtype(dtype).name} on the device; "
                             f"received {array.dtype}.")
        if not array.is_c_contiguous():
            raise ValueError(f"{name} must be C-contiguous on the device; received strides "
                             f"{array.strides} for shape {array.shape}.")
    else:
        array = np.ascontiguousarray(array, dtype)
    if tuple(array.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}; received {list(array.shape)}.")
    if isinstance(array, np.ndarray):
        array = cuda.to_device(array, stream=stream)
    return array


def mask_or_empty(mask, N, T, stream):
    """The [N, T] mask, time-major [T, N] on the device, or an empty [0, N]."""
    if mask is None:
        return scratch("no_mask", (0, N), np.bool_, stream)
    return time_major(mask, "mask", (N, T), np.bool_, stream)


def recurrent_mask_or_empty(recurrent_mask, N, H, stream):
    """The [4, N, H] recurrent dropout mask on the device, or an empty [0, N, H]."""
    if recurrent_mask is None:
        return scratch("no_recurrent_mask", (0, N, H), np.float32, stream)
    return to_device(recurrent_mask, "recurrent_mask", (4, N, H), np.float32, stream)


def time_major(array, name, shape, dtype, stream):
    """A batch-major [N, T, ...] input, validated, as a time-major [T, N, ...] device array."""
    if is_device_array(array):
        return swap_leading(to_device(array, name, shape, dtype, stream), stream)
    array = np.asarray(array, dtype)
    if tuple(array.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}; received {list(array.shape)}.")
    swapped = (shape[1], shape[0]) + tuple(shape[2:])
    return to_device(np.swapaxes(array, 0, 1), name, swapped, dtype, stream)


def swap_leading(array, stream):
    """[A, B, ...] -> [B, A, ...] on the device, through `swap_leading_axes`."""
    A, B = array.shape[:2]
    rest = tuple(array.shape[2:])
    K = int(np.prod(rest, dtype=np.int64))
    swapped = cuda.device_array((B, A) + rest, array.dtype, stream=stream)
    if A * B * K:
        blocks = min(_SWAP_MAX_BLOCKS, A * B)
        swap_leading_axes[blocks, _SWAP_THREADS, stream](array.reshape(A, B, K),
                                                         swapped.reshape(B, A, K))
    return swapped


def to_host(arrays, stream):
    """The device arrays copied to NumPy, after the stream has finished."""
    host = tuple(a.copy_to_host(stream=stream) for a in arrays)
    stream.synchronize()
    return host
