"""The CPU host drivers: NumPy arrays in, the step kernels run over blocks of rows.

`forward` and `backward` have the same signatures as the CUDA drivers
(`fusedlstm.kernels.cuda`), batch-major. They check every input against the
sequence shape first (`fusedlstm.kernels.checks`: float32 and bool arrays,
C-contiguous, a `ValueError` naming the argument otherwise): the kernels run
without bounds checks. An empty batch (N=0) or sequence (T=0) runs no kernel:
the results are empty, and with T=0 the final states are the initial ones.
"""

import numpy as np

from ..checks import check_backward, check_forward
from . import compile_notice
from .panels import pack_backward, pack_forward
from .steps import block_kernels
from .threads import run_blocks


def forward(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, activation,
            recurrent_activation, zero_output_for_mask, training, out=None):
    """Runs `forward_steps` over blocks of rows, on NumPy arrays, batch-major.

    Args:
        xw: [N, T, 4H]; recurrent_kernel: [H, 4H]; h0, c0: [N, H]; all float32
            and C-contiguous, as every input here.
        mask: [N, T] bool or None; recurrent_mask: [4, N, H] or None.
        training: save what `backward` needs.
        out: C-contiguous float32 arrays to write the results into (a framework's
            own buffers), in the order returned; allocated here when None.

    Returns:
        `(outputs [N, T, H], h_n, c_n, saved)`, with `saved = (h_in, c_seq,
        gates)` when training, else None; `h_in` [N, T, H] holds the state
        each step read, for the recurrent kernel's gradient.

    Raises:
        ValueError: an input's shape, dtype or layout does not match `xw`'s.
    """
    N, T, H = check_forward(xw, recurrent_kernel, h0, c0, mask, recurrent_mask)
    steps = T if training else 0
    shapes = [(N, T, H), (N, H), (N, H), (N, steps, H), (N, T + 1 if training else 0, H),
              (N, steps, 4 * H)]
    outputs, h_n, c_n, h_in, c_seq, gates = _results(shapes, out)
    if N == 0 or T == 0:
        h_n[...] = h0
        c_n[...] = c0
        if training:
            c_seq[:, 0] = c0
    else:
        arguments = (
            xw, pack_forward(recurrent_kernel), h0, c0, _mask_or_empty(mask, N),
            _recurrent_mask_or_empty(recurrent_mask, N, H), bool(zero_output_for_mask),
            outputs, h_n, c_n, h_in, c_seq, gates)
        _run_kernel("forward", activation, recurrent_activation, arguments, N, T * 8 * H * H)
    saved = (h_in, c_seq, gates) if training else None
    return outputs, h_n, c_n, saved


def backward(recurrent_kernel, mask, recurrent_mask, activation, recurrent_activation,
             zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n, out=None):
    """Runs `backward_steps` over blocks of rows, on NumPy arrays, batch-major.

    Args:
        out: arrays to write the results into, as for `forward`, or None.

    Returns:
        `(d_xw [N, T, 4H], d_h0, d_c0)`.

    Raises:
        ValueError: an input's shape, dtype or layout does not match `d_outputs`'.
    """
    N, T, H = check_backward(recurrent_kernel, mask, recurrent_mask, saved, d_outputs, d_h_n,
                             d_c_n)
    _, c_seq, gates = saved
    d_xw, d_h0, d_c0 = _results([(N, T, 4 * H), (N, H), (N, H)], out)
    if N == 0 or T == 0:
        d_h0[...] = d_h_n
        d_c0[...] = d_c_n
    else:
        arguments = (
            pack_backward(recurrent_kernel), _mask_or_empty(mask, N),
            _recurrent_mask_or_empty(recurrent_mask, N, H), bool(zero_output_for_mask), c_seq,
            gates, d_outputs, d_h_n, d_c_n, d_xw, d_h0, d_c0)
        _run_kernel("backward", activation, recurrent_activation, arguments, N, T * 8 * H * H)
    return d_xw, d_h0, d_c0


def _run_kernel(direction, activation, recurrent_activation, arguments, rows, flops_per_row):
    """Runs the `direction` ("forward" or "backward") block kernel of an activation pair
    over blocks of `rows`, announcing its first compile."""
    forward_block, backward_block = block_kernels(int(activation), int(recurrent_activation))
    kernel = forward_block if direction == "forward" else backward_block
    with compile_notice.on_first_compile(direction, activation, recurrent_activation, kernel):
        run_blocks(kernel, arguments, rows, flops_per_row)


def warm_up(activation, recurrent_activation, training=True):
    """Compiles the kernels of one activation pair, or loads them from Numba's disk cache.

    Args:
        activation, recurrent_activation: codes from `gates.ACTIVATION_CODES`.
        training: the backward kernel too, not only the forward one.

    Returns:
        `(compiled, cache_path)`: whether any kernel was compiled rather than
        loaded, and where Numba caches them.
    """
    xw = np.zeros((1, 1, 4), np.float32)
    recurrent_kernel = np.zeros((1, 4), np.float32)
    state = np.zeros((1, 1), np.float32)
    outputs, h_n, c_n, saved = forward(xw, recurrent_kernel, state, state, None, None,
                                       activation, recurrent_activation, False, training)
    if training:
        backward(recurrent_kernel, None, None, activation, recurrent_activation, False, saved,
                 outputs, h_n, c_n)
    kernels = block_kernels(int(activation), int(recurrent_activation))[:2 if training else 1]
    compiled = any(sum(kernel.stats.cache_misses.values()) for kernel in kernels)
    return compiled, kernels[0].stats.cache_path


def aligned_empty(shape, alignment=64):
    """An uninitialized float32 array whose data is 64-byte aligned: TensorFlow
    adopts such a callback result without copying it."""
    size = int(np.prod(shape)) * 4
    buffer = np.empty(size + alignment, np.uint8)
    start = -buffer.ctypes.data % alignment
    return buffer[start:start + size].view(np.float32).reshape(shape)


def _results(shapes, out):
    """The arrays a driver writes its results into: `out`, checked, or new aligned ones."""
    if out is None:
        return [aligned_empty(shape) for shape in shapes]
    out = list(out)[:len(shapes)] + [aligned_empty(s) for s in shapes[len(out):]]
    for array, shape in zip(out, shapes):
        if (array.shape != tuple(shape) or array.dtype != np.float32
                or not array.flags.c_contiguous or not array.flags.writeable):
            raise ValueError(
                f"Expected a writable C-contiguous float32 array of shape {tuple(shape)} to "
                f"write a result into. Received: shape={array.shape}, dtype={array.dtype}, "
                f"flags={'C' if array.flags.c_contiguous else 'not C'}-contiguous, "
                f"{'writable' if array.flags.writeable else 'read-only'}")
    return out


def _mask_or_empty(mask, N):
    return np.zeros((N, 0), np.bool_) if mask is None else mask


def _recurrent_mask_or_empty(recurrent_mask, N, H):
    return np.zeros((0, N, H), np.float32) if recurrent_mask is None else recurrent_mask
