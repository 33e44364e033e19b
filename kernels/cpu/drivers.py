"""The CPU host drivers: NumPy arrays in, the layer's kernels run over blocks of rows.

`forward` and `backward` own the whole layer: the inputs and weights go in,
the outputs (forward) or the gradients of the inputs, the weights and the
initial states (backward) come out; the input projection `x @ kernel + bias`
is computed inside the kernels (`steps`). Batch-major. They check every input
against the sequence shape first (`fusedlstm.kernels.checks`: float32 and bool
arrays, C-contiguous, a `ValueError` naming the argument otherwise): the
kernels run without bounds checks. An empty batch (N=0) or sequence (T=0)
runs no kernel: the results are empty, the weight gradients zero, and with
T=0 the final states are the initial ones.
"""

import numpy as np

from ..checks import check_layer_backward, check_layer_forward
from . import compile_notice
from .panels import PANEL, pack_backward, pack_forward
from .steps import block_kernels
from .threads import block_bounds, run_blocks, thread_count


def forward(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask, recurrent_mask,
            activation, recurrent_activation, zero_output_for_mask, training, out=None):
    """Runs `forward_steps` over blocks of rows, on NumPy arrays, batch-major.

    Args:
        x: [N, T, C]; kernel: [C, 4H]; bias: [4H] (zeros for a layer without
            one); recurrent_kernel: [H, 4H]; h0, c0: [N, H]; all float32 and
            C-contiguous, as every input here.
        mask: [N, T] bool or None.
        input_mask: [4, N, C] or None: gate g's projection is
            `(x * input_mask[g][:, None, :]) @ kernel[:, g*H:(g+1)*H]`.
        recurrent_mask: [4, N, H] or None: gate g's recurrent product uses
            `h * recurrent_mask[g]`.
        activation, recurrent_activation: codes from `gates.ACTIVATION_CODES`.
        zero_output_for_mask: masked steps output zeros, not the last output.
        training: save what `backward` needs.
        out: C-contiguous float32 arrays to write the results into (a framework's
            own buffers), in the order returned; allocated here when None.

    Returns:
        `(outputs [N, T, H], h_n, c_n, saved)`, with `saved = (h_in, c_seq,
        gates)` when training, else None; `h_in` [N, T, H] holds the state
        each step read (slot 0 is h0), `c_seq` [N, T+1, H] the carries (slot 0
        is c0), `gates` [N, T, 4H] the activations i, f, c, o.

    Raises:
        ValueError: an input's shape, dtype or layout does not match `x`'s and
            `recurrent_kernel`'s.
    """
    N, T, C, H = check_layer_forward(x, kernel, bias, recurrent_kernel, h0, c0, mask,
                                     input_mask, recurrent_mask)
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
            x, pack_forward(kernel), bias, pack_forward(recurrent_kernel), h0, c0,
            _mask_or_empty(mask, N), _dropout_or_empty(input_mask, N, C),
            _dropout_or_empty(recurrent_mask, N, H), bool(zero_output_for_mask),
            outputs, h_n, c_n, h_in, c_seq, gates)
        _run_kernel("forward", activation, recurrent_activation, arguments, N,
                    _flops_per_row(T, C, H))
    saved = (h_in, c_seq, gates) if training else None
    return outputs, h_n, c_n, saved


def backward(x, kernel, recurrent_kernel, mask, input_mask, recurrent_mask, activation,
             recurrent_activation, zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n,
             out=None):
    """Runs `backward_steps` over blocks of rows, on NumPy arrays, batch-major.

    Args:
        x, kernel, recurrent_kernel, mask, input_mask, recurrent_mask,
        activation, recurrent_activation, zero_output_for_mask: as for `forward`.
        saved: what `forward(..., training=True)` returned.
        d_outputs: [N, T, H]; d_h_n, d_c_n: [N, H]: the gradients reaching the
            outputs and the final states.
        out: arrays to write the results into, as for `forward`, or None.

    Returns:
        `(d_x [N, T, C], d_kernel [C, 4H], d_recurrent_kernel [H, 4H], d_bias [4H],
        d_h0 [N, H], d_c0 [N, H])`. The weight gradients are summed over the
        blocks of rows in a fixed order: the same inputs and thread count give
        the same bits.

    Raises:
        ValueError: an input's shape, dtype or layout does not match `x`'s and
            `recurrent_kernel`'s.
    """
    N, T, C, H = check_layer_backward(x, kernel, recurrent_kernel, mask, input_mask,
                                      recurrent_mask, saved, d_outputs, d_h_n, d_c_n)
    d_x, d_kernel, d_recurrent_kernel, d_bias, d_h0, d_c0 = _results(
        [(N, T, C), (C, 4 * H), (H, 4 * H), (4 * H,), (N, H), (N, H)], out)
    if N == 0 or T == 0:
        for array in (d_x, d_kernel, d_recurrent_kernel, d_bias):
            array[...] = 0
        d_h0[...] = d_h_n
        d_c0[...] = d_c_n
        return d_x, d_kernel, d_recurrent_kernel, d_bias, d_h0, d_c0
    h_in, c_seq, gates = saved
    flops_per_row = 2 * _flops_per_row(T, C, H)
    bounds = block_bounds(N, flops_per_row, thread_count())
    width = 4 * -(-H // PANEL) * PANEL
    parts = [np.zeros((len(bounds),) + shape, np.float32)
             for shape in ((C, width), (H, width), (4 * H,))]
    arguments = (
        bounds[0][1] - bounds[0][0], x, pack_backward(kernel), pack_backward(recurrent_kernel),
        _mask_or_empty(mask, N), _dropout_or_empty(input_mask, N, C),
        _dropout_or_empty(recurrent_mask, N, H), bool(zero_output_for_mask), h_in, c_seq,
        gates, d_outputs, d_h_n, d_c_n, d_x, *parts, d_h0, d_c0)
    _run_kernel("backward", activation, recurrent_activation, arguments, N, flops_per_row,
                bounds)
    d_kernel[...] = _gate_columns(parts[0].sum(0), H)
    d_recurrent_kernel[...] = _gate_columns(parts[1].sum(0), H)
    d_bias[...] = parts[2].sum(0)
    return d_x, d_kernel, d_recurrent_kernel, d_bias, d_h0, d_c0


def _flops_per_row(T, C, H):
    """Multiply-add FLOPs of one batch row's forward pass: projection and recurrence."""
    return T * 8 * H * (C + H)


def _gate_columns(padded, H):
    """[K, 4H] from [K, 4 * P * PANEL], gate g in columns from g * P * PANEL."""
    K = padded.shape[0]
    return padded.reshape(K, 4, -1)[:, :, :H].reshape(K, 4 * H)


def _run_kernel(direction, activation, recurrent_activation, arguments, rows, flops_per_row,
                bounds=None):
    """Runs the `direction` ("forward" or "backward") block kernel of an activation pair
    over blocks of `rows`, announcing its first compile."""
    forward_block, backward_block = block_kernels(int(activation), int(recurrent_activation))
    kernel = forward_block if direction == "forward" else backward_block
    with compile_notice.on_first_compile(direction, activation, recurrent_activation, kernel):
        run_blocks(kernel, arguments, rows, flops_per_row, bounds)


def warm_up(activation, recurrent_activation, training=True):
    """Compiles the kernels of one activation pair, or loads them from Numba's disk cache.

    Args:
        activation, recurrent_activation: codes from `gates.ACTIVATION_CODES`.
        training: the backward kernel too, not only the forward one.

    Returns:
        `(compiled, cache_path)`: whether any kernel was compiled rather than
        loaded, and where Numba caches them.
    """
    x = np.zeros((1, 1, 1), np.float32)
    kernel = np.zeros((1, 4), np.float32)
    bias = np.zeros(4, np.float32)
    state = np.zeros((1, 1), np.float32)
    outputs, h_n, c_n, saved = forward(x, kernel, bias, kernel, state, state, None, None, None,
                                       activation, recurrent_activation, False, training)
    if training:
        backward(x, kernel, kernel, None, None, None, activation, recurrent_activation, False,
                 saved, outputs, h_n, c_n)
    kernels = block_kernels(int(activation), int(recurrent_activation))[:2 if training else 1]
    compiled = any(sum(kernel.stats.cache_misses.values()) for kernel in kernels)
    return compiled, kernels[0].stats.cache_path


def aligned_empty(shapes, alignment=64):
    """Uninitialized float32 arrays of `shapes`, each 64-byte aligned (TensorFlow adopts
    such a callback result without copying it), cut from one allocation.

    One allocation per call, not one per result: finding a buffer's address from
    Python costs microseconds, which small problems pay on every call. The
    arrays keep the whole buffer alive until the last of them goes.
    """
    nbytes = []
    for shape in shapes:
        size = 4
        for dim in shape:
            size *= dim
        nbytes.append(size)
    buffer = np.empty(sum(-(-n // alignment) * alignment for n in nbytes) + alignment, np.uint8)
    start = -buffer.__array_interface__["data"][0] % alignment
    arrays = []
    for shape, size in zip(shapes, nbytes):
        arrays.append(buffer[start:start + size].view(np.float32).reshape(shape))
        start += -(-size // alignment) * alignment
    return arrays


def _results(shapes, out):
    """The arrays a driver writes its results into: `out`, checked, or new aligned ones."""
    if out is None:
        return aligned_empty(shapes)
    out = list(out)[:len(shapes)]
    out += aligned_empty(shapes[len(out):])
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


def _dropout_or_empty(dropout_mask, N, K):
    return np.zeros((0, N, K), np.float32) if dropout_mask is None else dropout_mask
