"""The kernel factory: the six LSTM kernels, compiled once per activation pair.

Every kernel starts with the same prologue (`device.forward_prologue`,
`device.backward_prologue`): the block's slice of units and its weight cache.
The persistent (cooperative grid) and one-block kernels of each direction are
one body, built twice: with a grid barrier and with a block barrier
(`device.barrier`, a compile-time choice). The step kernels run one step per
launch over any grid. `swap_leading_axes` moves the drivers' batch-major
arrays to the kernels' time-major layout and back.
"""

import functools
import types as pytypes

from numba import cuda, float32

from ..gates import ACTIVATION_CODES
from .device import (SHARED_FLOATS, SIMULATED, backward_cells, backward_initial_states,
                     backward_products, backward_prologue, barrier, copy_units,
                     forward_initial_states, forward_prologue, forward_step)
from .launch import LAUNCH_BOUNDS

# The simulator's jit takes no launch bounds.
_kernel = cuda.jit(cache=True) if SIMULATED else cuda.jit(cache=True, launch_bounds=LAUNCH_BOUNDS)

_FORWARD_DOC = """Runs the LSTM recurrence over all timesteps in one launch.

    `lstm_forward_persistent`: a cooperative launch of `ceil(H / units)`
    blocks of a multiple of `lanes` threads, at most
    `max_cooperative_grid_blocks`, a grid barrier between steps.
    `lstm_forward_block`: one block (`units >= H`), a block barrier.

    Args:
        units, weight_floats: hidden units per block; shared-memory floats
            that cache weights.
        u: [H, 4H] `recurrent_kernel`.
        u_t: [4H * H] scratch: the streamed weights, transposed.
        h_buf: [2, N, H] scratch: the hidden state, double-buffered.
        Others: as for `kernels.cpu.lstm_forward`.
    """

_BACKWARD_DOC = """Backpropagates through the recurrence (BPTT) in one launch.

    Launched as the forward kernel of the same name.

    Args:
        u: [H, 4H] `recurrent_kernel`; u_flat: the same memory, flat.
        mask, recurrent_mask, zero_output_for_mask: as for the forward.
        c_seq: [T+1, N, H] and gates: [T, N, 4H], saved by the forward.
        d_outputs: [T, N, H] gradient of the outputs.
        d_h_n, d_c_n: [N, H] gradients of the final states.
        d_xw: [T, N, 4H] gradient of the input projection, written.
        d_h0, d_c0: [N, H] gradients of the initial states, written (they
            hold the running dh and dc during the pass).
        carried: [N, H] scratch: output gradient carried through masked
            steps.
    """


def _named_kernel(function, name, doc):
    """Compiles `function` as the kernel `name` (its name in PTX, SASS and the cache)."""
    function.__name__ = function.__qualname__ = name
    function.__doc__ = doc
    return _kernel(function)


def _forward_sequence_kernel(cooperative, act, ract, lanes, dropout):
    """`lstm_forward_persistent` (cooperative) or `lstm_forward_block`."""

    def kernel(units, weight_floats, xw, u, u_t, h0, c0, mask, recurrent_mask,
               zero_output_for_mask, outputs, h_n, c_n, h_seq, c_seq, gates, h_buf):
        cache = cuda.shared.array(SHARED_FLOATS, float32)
        first, width, cached_k = forward_prologue(units, weight_floats, u, u_t, cache)
        forward_initial_states(first, width, h0, c0, h_buf[0], c_n, h_seq, c_seq)
        barrier(cooperative)
        T = outputs.shape[0]
        for t in range(T):
            forward_step(t, xw, u_t, cache, cached_k, first, width, lanes, h_buf[t % 2],
                         h_buf[(t + 1) % 2], c_n, c_n, mask, recurrent_mask, dropout, act, ract,
                         zero_output_for_mask, outputs, h_seq, c_seq, gates)
            barrier(cooperative)
        copy_units(h_buf[T % 2], h_n, first, width)

    name = "lstm_forward_persistent" if cooperative else "lstm_forward_block"
    return _named_kernel(kernel, name, _FORWARD_DOC)


def _backward_sequence_kernel(cooperative, act, ract, lanes, dropout):
    """`lstm_backward_persistent` (cooperative) or `lstm_backward_block`."""

    def kernel(units, weight_floats, u, u_flat, mask, recurrent_mask, zero_output_for_mask,
               c_seq, gates, d_outputs, d_h_n, d_c_n, d_xw, d_h0, d_c0, carried):
        cache = cuda.shared.array(SHARED_FLOATS, float32)
        first, width, cached_c = backward_prologue(units, weight_floats, u, cache)
        backward_initial_states(first, width, d_h_n, d_c_n, d_h0, d_c0, carried)
        cuda.syncthreads()
        for t in range(d_outputs.shape[0] - 1, -1, -1):
            backward_cells(t, first, width, mask, act, ract, zero_output_for_mask, c_seq,
                           gates, d_outputs, d_xw, d_h0, d_c0, carried)
            barrier(cooperative)
            backward_products(t, u_flat, cache, cached_c, first, width, lanes, mask,
                              recurrent_mask, dropout, d_xw, d_h0)
            cuda.syncthreads()

    name = "lstm_backward_persistent" if cooperative else "lstm_backward_block"
    return _named_kernel(kernel, name, _BACKWARD_DOC)


def _make_kernels(activation, recurrent_activation, lanes, dropout):
    """The forward and backward kernels specialized for one activation pair.

    The activation codes, `lanes` (threads per register-tile group, a power
    of two up to 32) and `dropout` (whether a recurrent dropout mask applies)
    are closure constants, so the gate math is compiled for the pair alone,
    the inner loops' strides are known and kernels without dropout carry no
    dropout code.
    Every kernel takes `(units, weight_floats)` first (the step kernels after
    the step): hidden units per block and shared-memory floats used to cache
    weights (at most `device.WEIGHT_FLOATS`).
    """
    act, ract = activation, recurrent_activation

    @_kernel
    def lstm_forward_step(t, units, weight_floats, xw, u, u_t, h0, c0, mask,
                          recurrent_mask, zero_output_for_mask, outputs, h_n, c_n, h_seq, c_seq,
                          gates, h_buf):
        """Step `t` of `lstm_forward_persistent` over any grid: launch once per step."""
        cache = cuda.shared.array(SHARED_FLOATS, float32)
        first, width, cached_k = forward_prologue(units, weight_floats, u, u_t, cache)
        h = h_buf[t % 2]
        c_prev = c_n
        if t == 0:
            h = h0
            c_prev = c0
            if h_seq.shape[0] > 0:
                forward_initial_states(first, width, h0, c0, h_seq[0], c_seq[0], h_seq, c_seq)
        cuda.syncthreads()
        forward_step(t, xw, u_t, cache, cached_k, first, width, lanes, h, h_buf[(t + 1) % 2],
                     c_prev, c_n, mask, recurrent_mask, dropout, act, ract, zero_output_for_mask,
                     outputs, h_seq, c_seq, gates)
        if t == outputs.shape[0] - 1:
            cuda.syncthreads()
            copy_units(h_buf[(t + 1) % 2], h_n, first, width)

    @_kernel
    def lstm_backward_step(t, units, weight_floats, u, u_flat, mask, recurrent_mask,
                           zero_output_for_mask, c_seq, gates, d_outputs, d_h_n, d_c_n, d_xw,
                           d_h0, d_c0, carried):
        """The recurrent product of step t + 1, then the cells of step t, over any grid.

        Launch for t = T - 1 down to -1 (the last launch only finishes step 0).
        """
        cache = cuda.shared.array(SHARED_FLOATS, float32)
        first, width, cached_c = backward_prologue(units, weight_floats, u, cache)
        T = d_outputs.shape[0]
        if t == T - 1:
            backward_initial_states(first, width, d_h_n, d_c_n, d_h0, d_c0, carried)
        cuda.syncthreads()
        if t + 1 < T:
            backward_products(t + 1, u_flat, cache, cached_c, first, width, lanes, mask,
                              recurrent_mask, dropout, d_xw, d_h0)
            cuda.syncthreads()
        if t >= 0:
            backward_cells(t, first, width, mask, act, ract, zero_output_for_mask, c_seq,
                           gates, d_outputs, d_xw, d_h0, d_c0, carried)

    options = (act, ract, lanes, dropout)
    return pytypes.SimpleNamespace(
        lstm_forward_persistent=_forward_sequence_kernel(True, *options),
        lstm_forward_block=_forward_sequence_kernel(False, *options),
        lstm_forward_step=lstm_forward_step,
        lstm_backward_persistent=_backward_sequence_kernel(True, *options),
        lstm_backward_block=_backward_sequence_kernel(False, *options),
        lstm_backward_step=lstm_backward_step)


@functools.lru_cache(maxsize=None)
def kernels_for(activation, recurrent_activation, lanes=32, dropout=False):
    """The kernels for one pair of codes from `gates.ACTIVATION_CODES`, one
    `lanes` and with or without recurrent dropout; they compile on first
    launch."""
    codes = set(ACTIVATION_CODES.values())
    if activation not in codes or recurrent_activation not in codes:
        raise ValueError(f"activation codes must be among {sorted(codes)}; received "
                         f"{activation!r} and {recurrent_activation!r}.")
    return _make_kernels(activation, recurrent_activation, lanes, bool(dropout))


@_kernel
def swap_leading_axes(src, dst):
    """dst[b, a, k] = src[a, b, k]: the drivers' batch-major [N, T, K] arrays to the
    kernels' time-major [T, N, K] ones and back. Blocks stride over the rows (a, b),
    threads over k: one division per row, coalesced loads and stores."""
    A, B, K = src.shape
    for row in range(cuda.blockIdx.x, A * B, cuda.gridDim.x):
        a = row // B
        b = row - a * B
        for k in range(cuda.threadIdx.x, K, cuda.blockDim.x):
            dst[b, a, k] = src[a, b, k]
