"""Host drivers of the CUDA kernels: `forward` and `backward`, batch-major.

The same arguments and results as `kernels.cpu.forward` and `backward`, plus
launch options. They validate the inputs (`kernels.checks`, shared with the CPU
drivers), move them to the device (`memory`), pick and launch the kernels
(`launch`) and return the results. An empty batch (N=0) or sequence (T=0)
launches nothing (a grid of no blocks is an error): its results, the CPU
drivers' (empty arrays, the initial states as final ones), are made on the
host and moved to the device.
"""

import numpy as np
from numba import cuda

from ..checks import check_backward, check_forward
from .factory import kernels_for
from .launch import check_launch_options, launch
from .memory import (as_stream, device_view, is_device_array, mask_or_empty,
                     recurrent_mask_or_empty, scratch, swap_leading, time_major, to_device,
                     to_host)


def forward(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, activation,
            recurrent_activation, zero_output_for_mask, training, *, stream=None,
            block_size=256, lanes=32, units_per_block=None, cache_floats=None,
            single_block=None, step_launches=False):
    """Host driver for the forward kernels, batch-major as `kernels.cpu.forward`.

    The kernels run time-major: the driver swaps the leading axes of its
    sequence inputs and results on the way in and out (`swap_leading_axes`).

    Args:
        xw: [N, T, 4H] float32 input projection, bias included.
        recurrent_kernel: [H, 4H]; h0, c0: [N, H].
        mask: [N, T] bool or None; recurrent_mask: [4, N, H] or None.
        activation, recurrent_activation: codes from `gates.ACTIVATION_CODES`.
        zero_output_for_mask: masked steps output zeros instead of the last
            unmasked output.
        training: save what `backward` needs.
        stream: a Numba stream, an integer CUDA stream handle (for example
            `torch.cuda.current_stream().cuda_stream`), or None for the
            default stream. Device inputs must be ready in this stream's
            order (produced on it, or synchronized by the caller): the
            driver does not wait on the stream named by their
            `__cuda_array_interface__`.
        block_size: threads per block, at most 256 (the kernels' launch
            bounds) and a multiple of 32 on a GPU.
        lanes: threads that share one register tile's dot products, a
            power of two up to 32.
        units_per_block: hidden units per block; None picks a slice that
            keeps the weights on chip and spreads over the SMs.
        cache_floats: shared-memory floats used to cache weights, at most
            `device.WEIGHT_FLOATS` (the default); smaller values stream more
            weights through L2.
        single_block: True runs one block (no cooperative launch), False a
            cooperative grid, None picks by problem size.
        step_launches: True runs one launch per timestep over
            `ceil(H / units_per_block)` blocks (no grid barrier, no limit on
            the grid): slower, but it runs multi-block in the CUDA simulator.

    Returns:
        `(outputs [N, T, H], h_n, c_n, saved)`, with `saved = (h_in [N, T, H],
        c_seq [N, T+1, H], gates [N, T, 4H])` when training, else None. NumPy
        arrays when `xw` is a NumPy array, otherwise Numba device arrays
        written on `stream`.
    """
    N, T, H = check_forward(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, contiguous=False)
    cache_floats = check_launch_options(block_size, lanes, units_per_block, cache_floats)
    stream = as_stream(stream)
    on_host = not is_device_array(xw)
    if N == 0 or T == 0:
        outputs, h_n, c_n, saved = _empty_forward(*_host((h0, c0), stream), T, training)
        outputs, h_n, c_n = _placed((outputs, h_n, c_n), on_host, stream)
        return outputs, h_n, c_n, None if saved is None else _placed(saved, on_host, stream)
    f32 = np.float32
    xw = time_major(xw, "xw", (N, T, 4 * H), f32, stream)
    recurrent_kernel = to_device(recurrent_kernel, "recurrent_kernel", (H, 4 * H), f32, stream)
    h0 = to_device(h0, "h0", (N, H), f32, stream)
    c0 = to_device(c0, "c0", (N, H), f32, stream)
    mask = mask_or_empty(mask, N, T, stream)
    recurrent_mask = recurrent_mask_or_empty(recurrent_mask, N, H, stream)
    kernels = kernels_for(int(activation), int(recurrent_activation), lanes,
                          recurrent_mask.shape[0] > 0)
    outputs = cuda.device_array((T, N, H), f32, stream=stream)
    h_n = cuda.device_array((N, H), f32, stream=stream)
    c_n = cuda.device_array((N, H), f32, stream=stream)
    h_seq = cuda.device_array((T + 1 if training else 0, N, H), f32, stream=stream)
    c_seq = cuda.device_array((T + 1 if training else 0, N, H), f32, stream=stream)
    gates = cuda.device_array((T if training else 0, N, 4 * H), f32, stream=stream)
    h_buf = scratch("h_buf", (2, N, H), f32, stream)
    u_t = scratch("u_t", (4 * H * H,), f32, stream)
    launch((kernels.lstm_forward_block, kernels.lstm_forward_persistent,
             kernels.lstm_forward_step),
            (xw, recurrent_kernel, u_t, h0, c0, mask, recurrent_mask, bool(zero_output_for_mask),
             outputs, h_n, c_n, h_seq, c_seq, gates, h_buf),
            range(T), N, H, stream, block_size, units_per_block, cache_floats, single_block,
            step_launches)
    results = (swap_leading(outputs, stream), h_n, c_n, swap_leading(h_seq[:T], stream),
               swap_leading(c_seq, stream), swap_leading(gates, stream))
    if on_host:
        results = to_host(results, stream)
    outputs, h_n, c_n, h_in, c_seq, gates = results
    saved = (h_in, c_seq, gates) if training else None
    return outputs, h_n, c_n, saved


def backward(recurrent_kernel, mask, recurrent_mask, activation, recurrent_activation,
             zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n, *, stream=None,
             block_size=256, lanes=32, units_per_block=None, cache_floats=None,
             single_block=None, step_launches=False):
    """Host driver for the backward kernels, batch-major as `kernels.cpu.backward`.

    Args:
        recurrent_kernel, mask, recurrent_mask, activation,
        recurrent_activation, zero_output_for_mask: as for `forward`.
        saved: `(h_in, c_seq, gates)` from `forward(..., training=True)`.
        d_outputs: [N, T, H] gradient of the outputs.
        d_h_n, d_c_n: [N, H] gradients of the final states.
        stream, block_size, lanes, units_per_block, cache_floats,
        single_block, step_launches: as for `forward`.

    Returns:
        `(d_xw [N, T, 4H], d_h0, d_c0)`: NumPy arrays when `d_outputs` is a
        NumPy array, otherwise Numba device arrays written on `stream`.
    """
    N, T, H = check_backward(recurrent_kernel, mask, recurrent_mask, saved, d_outputs, d_h_n,
                             d_c_n, contiguous=False)
    cache_floats = check_launch_options(block_size, lanes, units_per_block, cache_floats)
    stream = as_stream(stream)
    on_host = not is_device_array(d_outputs)
    if N == 0 or T == 0:
        d_h0, d_c0 = _host((d_h_n, d_c_n), stream)
        return _placed((np.zeros((N, T, 4 * H), np.float32), d_h0.copy(), d_c0.copy()),
                       on_host, stream)
    f32 = np.float32
    _, c_seq, gates = saved
    recurrent_kernel = to_device(recurrent_kernel, "recurrent_kernel", (H, 4 * H), f32, stream)
    mask = mask_or_empty(mask, N, T, stream)
    recurrent_mask = recurrent_mask_or_empty(recurrent_mask, N, H, stream)
    c_seq = time_major(c_seq, "c_seq", (N, T + 1, H), f32, stream)
    gates = time_major(gates, "gates", (N, T, 4 * H), f32, stream)
    d_outputs = time_major(d_outputs, "d_outputs", (N, T, H), f32, stream)
    d_h_n = to_device(d_h_n, "d_h_n", (N, H), f32, stream)
    d_c_n = to_device(d_c_n, "d_c_n", (N, H), f32, stream)
    d_xw = cuda.device_array((T, N, 4 * H), f32, stream=stream)
    d_h0 = cuda.device_array((N, H), f32, stream=stream)
    d_c0 = cuda.device_array((N, H), f32, stream=stream)
    carried = scratch("carried", (N, H), f32, stream)
    kernels = kernels_for(int(activation), int(recurrent_activation), lanes,
                          recurrent_mask.shape[0] > 0)
    launch((kernels.lstm_backward_block, kernels.lstm_backward_persistent,
             kernels.lstm_backward_step),
            (recurrent_kernel, recurrent_kernel.reshape(4 * H * H), mask, recurrent_mask,
             bool(zero_output_for_mask), c_seq, gates, d_outputs, d_h_n, d_c_n, d_xw, d_h0, d_c0,
             carried),
            range(T - 1, -2, -1), N, H, stream, block_size, units_per_block, cache_floats,
            single_block, step_launches)
    results = (swap_leading(d_xw, stream), d_h0, d_c0)
    return to_host(results, stream) if on_host else results


def _empty_forward(h0, c0, T, training):
    """The forward results of an empty batch or sequence (N=0 or T=0) on the host."""
    N, H = h0.shape
    f32 = np.float32
    saved = None
    if training:
        c_seq = np.zeros((N, T + 1, H), f32)
        c_seq[:, 0] = c0
        saved = (np.zeros((N, T, H), f32), c_seq, np.zeros((N, T, 4 * H), f32))
    return np.zeros((N, T, H), f32), h0.copy(), c0.copy(), saved


def _host(arrays, stream):
    """Contiguous NumPy arrays of `arrays`: device arrays copied back once `stream` has
    finished (`memory.to_host`), None kept."""
    return tuple(None if a is None
                 else to_host([device_view(a)], stream)[0] if is_device_array(a)
                 else np.ascontiguousarray(a) for a in arrays)


def _placed(arrays, on_host, stream):
    """`arrays` as the caller's kind: NumPy when its inputs were, else device arrays."""
    return tuple(arrays) if on_host else tuple(cuda.to_device(a, stream=stream) for a in arrays)
