"""The fused LSTM recurrence on the CPU: forward and backward `njit` kernels.

The framework computes the input projection `xw = x @ kernel + bias` for all
timesteps in one matmul and the weight gradients from what these kernels
return (`fusedlstm.projection`); the kernels run only the sequential part. Arrays are batch-major, as
Keras holds them: N batch rows, T timesteps, H units, gates in the column
order i, f, c, o.

Rows of a batch never interact, so the batch is cut into blocks of rows and
each block runs the whole sequence on its own, in a thread of its own: no
barrier between timesteps, and a slow or busy core holds up only the block it
runs while the other threads take the remaining blocks. Each step of a block
is one register-blocked product of its hidden states with the recurrent
kernel, packed in panels of `tile.LANES * 2` columns (`kernels.tile`), then
the cell math on each row while the products are still in cache.

Masking follows Keras: a masked step keeps `h` and `c` unchanged, and its
output is zero (`zero_output_for_mask`) or the last unmasked output (zero
before the first one). Recurrent dropout multiplies `h` by one mask per gate
before the recurrent product, as `keras.layers.LSTMCell` does.

Activation codes are compile-time constants: `block_kernels` closes the
kernels over one activation pair, which Numba freezes into the machine code
and keys its disk cache on, so a process compiles (or loads) only the pairs
it uses, and inference never compiles the backward kernel.
"""

import numpy as np
import functools

from numba import njit

from . import compile_notice
from .gates import compile_gates
from .threads import run_blocks
from .tile import LANES, make_tile

_gates = compile_gates(njit(inline="always", error_model="numpy", cache=True),
                       leaf_jit=njit(error_model="numpy", cache=True))
_cell_forward = _gates.cell_forward
_cell_backward = _gates.cell_backward

_VECTORS = 2
PANEL = _VECTORS * LANES
_tile_8 = make_tile(8, _VECTORS, 1)
_tile_4 = make_tile(4, _VECTORS, 2)
_tile_1 = make_tile(1, _VECTORS, 4)

_KERNEL_OPTIONS = {"nogil": True, "error_model": "numpy", "cache": True}


@njit(nogil=True, error_model="numpy", cache=True)
def panel_products(a, a_off, a_group_off, lda, rows, depth, packed, b_group_off, b_panel_off,
                    panels, c, c_group_off, ldc, groups):
    """`c[group, m, p] = a[group, m] @ packed[group, p]` for each group, panel p and row m < rows.

    Row m of group g of A (2-D) starts at flat offset `a_off + g * a_group_off
    + m * lda` and has `depth` floats; its panel p starts at `g * b_group_off +
    p * b_panel_off` in `packed` (1-D); the product lands at `g * c_group_off +
    p * PANEL + m * ldc` in `c` (2-D). Panels run outermost so that each stays
    in cache across the row tiles. One compiled function serves the forward
    and backward kernels of every activation pair.
    """
    for g in range(groups):
        a_group = a_off + g * a_group_off
        for p in range(panels):
            b_off = g * b_group_off + p * b_panel_off
            c_off = g * c_group_off + p * PANEL
            m = 0
            while m + 8 <= rows:
                _tile_8(a, a_group + m * lda, lda, packed, b_off, c, c_off + m * ldc, ldc, depth)
                m += 8
            while m + 4 <= rows:
                _tile_4(a, a_group + m * lda, lda, packed, b_off, c, c_off + m * ldc, ldc, depth)
                m += 4
            while m < rows:
                _tile_1(a, a_group + m * lda, lda, packed, b_off, c, c_off + m * ldc, ldc, depth)
                m += 1


@njit(error_model="numpy", cache=True)
def pack_forward(recurrent_kernel):
    """[4, P, H, PANEL]: each gate block of [H, 4H] in panels of PANEL columns, zero-padded."""
    H = recurrent_kernel.shape[0]
    panels = -(-H // PANEL)
    packed = np.zeros((4, panels, H, PANEL), np.float32)
    for g in range(4):
        for p in range(panels):
            j1 = min(PANEL, H - p * PANEL)
            for k in range(H):
                for j in range(j1):
                    packed[g, p, k, j] = recurrent_kernel[k, g * H + p * PANEL + j]
    return packed


@njit(error_model="numpy", cache=True)
def pack_backward(recurrent_kernel):
    """[P, 4H, PANEL]: the transpose [4H, H] in panels of PANEL columns, zero-padded."""
    H = recurrent_kernel.shape[0]
    panels = -(-H // PANEL)
    packed = np.zeros((panels, 4 * H, PANEL), np.float32)
    for p in range(panels):
        j1 = min(PANEL, H - p * PANEL)
        for j in range(j1):
            for k in range(4 * H):
                packed[p, k, j] = recurrent_kernel[p * PANEL + j, k]
    return packed


@njit(error_model="numpy", cache=True)
def _copy(dst, src):
    """dst[:] = src for [R, H] arrays of the same shape.

    A loop, not a slice assignment: Numba compiles the shape-mismatch error of
    every slice assignment, string formatting included, which took seconds of
    each kernel's first compile.
    """
    for n in range(src.shape[0]):
        for k in range(src.shape[1]):
            dst[n, k] = src[n, k]


@njit(inline="always", error_model="numpy", cache=True)
def _cell_row_forward(xw, row, t, z, n, width, c, h, outputs, gates, activation,
                      recurrent_activation):
    """The cell update of one row: pre-activations `xw[row, t] + z[n]`, carry
    `c[n]` updated in place, new hidden state into `h[n]` and `outputs[row, t]`,
    gate activations into `gates[row, t]` when it has steps.

    Plain indexing, no array views: a view per row would take and release a
    reference on the shared arrays, an atomic operation every thread contends on.
    """
    H = c.shape[1]
    save = gates.shape[1] > 0
    for k in range(H):
        i, f, g, o, c_new, h_new = _cell_forward(
            xw[row, t, k] + z[n, k], xw[row, t, H + k] + z[n, width + k],
            xw[row, t, 2 * H + k] + z[n, 2 * width + k],
            xw[row, t, 3 * H + k] + z[n, 3 * width + k], c[n, k],
            activation, recurrent_activation)
        c[n, k] = c_new
        h[n, k] = h_new
        outputs[row, t, k] = h_new
        if save:
            gates[row, t, k] = i
            gates[row, t, H + k] = f
            gates[row, t, 2 * H + k] = g
            gates[row, t, 3 * H + k] = o


@njit(inline="always", error_model="numpy", cache=True)
def _masked_row_forward(row, t, n, src, dst, outputs, gates, zero_output_for_mask):
    """A masked step of one row: state kept, output the last one (or zero)."""
    H = src.shape[1]
    keep_last = t > 0 and not zero_output_for_mask
    for k in range(H):
        dst[n, k] = src[n, k]
        outputs[row, t, k] = outputs[row, t - 1, k] if keep_last else 0
    for k in range(gates.shape[2] if gates.shape[1] > 0 else 0):
        gates[row, t, k] = 0


@njit(inline="always", error_model="numpy", cache=True)
def forward_steps(r0, r1, xw, packed, h0, c0, mask, recurrent_mask, activation,
                  recurrent_activation, zero_output_for_mask,
                  outputs, h_n, c_n, h_in, c_seq, gates):
    """Runs the recurrence over all T timesteps for batch rows [r0, r1).

    Args:
        r0, r1: the block's rows.
        xw: [N, T, 4H] input projection, bias included.
        packed: `pack_forward(recurrent_kernel)`, [4, P, H, PANEL].
        h0, c0: [N, H] initial states.
        mask: [N, T] bool, or [N, 0] for no mask.
        recurrent_mask: [4, N, H] recurrent dropout masks, or [0, N, H].
        activation, recurrent_activation: codes from `gates.ACTIVATION_CODES`.
        zero_output_for_mask: masked steps output zeros instead of the last
            unmasked output.
        outputs: [N, T, H], written.
        h_n, c_n: [N, H] final states, written.
        h_in: [N, T, H] the state each step reads (slot 0 is h0), written when
            training, else [N, 0, H].
        c_seq: [N, T+1, H] carries with slot 0 the initial one, written when
            training, else [N, 0, H].
        gates: [N, T, 4H] gate activations i, f, c, o, written when training,
            else [N, 0, 4H].
    """
    N, T, H = outputs.shape
    rows = r1 - r0
    panels = packed.shape[1]
    width = panels * PANEL
    training = gates.shape[1] > 0
    masked_steps = mask.shape[1] > 0
    dropout = recurrent_mask.shape[0] > 0
    flat_packed = packed.reshape(-1)
    z = np.empty((rows, 4 * width), np.float32)
    h = np.empty((2, rows, H), np.float32)
    _copy(h[0], h0[r0:r1])
    c = np.empty((rows, H), np.float32)
    _copy(c, c0[r0:r1])
    dropped = np.empty((4 * rows if dropout else rows, H), np.float32)
    for t in range(T):
        src = h[t % 2]
        dst = h[(t + 1) % 2]
        if training:
            _copy(h_in[r0:r1, t], src)
            _copy(c_seq[r0:r1, t], c)
        if dropout:
            for g in range(4):
                np.multiply(src, recurrent_mask[g, r0:r1], dropped[g * rows:(g + 1) * rows])
        panel_products(dropped if dropout else src, 0, rows * H if dropout else 0, H, rows, H,
                       flat_packed, panels * H * PANEL, H * PANEL, panels, z, width, 4 * width, 4)
        for n in range(rows):
            row = r0 + n
            if masked_steps and not mask[row, t]:
                _masked_row_forward(row, t, n, src, dst, outputs, gates, zero_output_for_mask)
            else:
                _cell_row_forward(xw, row, t, z, n, width, c, dst, outputs, gates, activation,
                                  recurrent_activation)
    _copy(h_n[r0:r1], h[T % 2])
    _copy(c_n[r0:r1], c)
    if training:
        _copy(c_seq[r0:r1, T], c)


@njit(inline="always", error_model="numpy", cache=True)
def _cell_row_backward(row, t, n, gates, c_seq, d_outputs, carried, dh, dc, d_xw, activation,
                       recurrent_activation):
    """Gradients of the cell update of one row: `d_xw[row, t]` written, `dc[n]`
    becomes the previous carry's gradient, `carried[n]` is consumed. Plain
    indexing, as in `_cell_row_forward`."""
    H = dh.shape[1]
    for k in range(H):
        d_xw[row, t, k], d_xw[row, t, H + k], d_xw[row, t, 2 * H + k], \
            d_xw[row, t, 3 * H + k], dc[n, k] = _cell_backward(
                gates[row, t, k], gates[row, t, H + k], gates[row, t, 2 * H + k],
                gates[row, t, 3 * H + k], c_seq[row, t, k], c_seq[row, t + 1, k],
                d_outputs[row, t, k] + carried[n, k] + dh[n, k], dc[n, k],
                activation, recurrent_activation)
        carried[n, k] = 0


@njit(inline="always", error_model="numpy", cache=True)
def _masked_row_backward(row, t, n, d_outputs, carried, d_xw, zero_output_for_mask):
    """A masked step of one row: no gate gradient; its output's gradient is carried
    to the last unmasked output, or dropped with `zero_output_for_mask`."""
    for k in range(d_xw.shape[2]):
        d_xw[row, t, k] = 0
    for k in range(carried.shape[1]):
        carried[n, k] = 0 if zero_output_for_mask else carried[n, k] + d_outputs[row, t, k]


@njit(inline="always", error_model="numpy", cache=True)
def _recurrent_grad_row(n, row, products, rows, recurrent_mask, dh):
    """dh[n] from the recurrent products of row n: one product, or one per gate
    weighted by that gate's recurrent dropout mask."""
    H = dh.shape[1]
    if recurrent_mask.shape[0] == 0:
        for k in range(H):
            dh[n, k] = products[n, k]
        return
    for k in range(H):
        dh[n, k] = (products[n, k] * recurrent_mask[0, row, k]
                    + products[rows + n, k] * recurrent_mask[1, row, k]
                    + products[2 * rows + n, k] * recurrent_mask[2, row, k]
                    + products[3 * rows + n, k] * recurrent_mask[3, row, k])


@njit(inline="always", error_model="numpy", cache=True)
def backward_steps(r0, r1, packed_t, mask, recurrent_mask, activation, recurrent_activation,
                   zero_output_for_mask, c_seq, gates, d_outputs, d_h_n, d_c_n,
                   d_xw, d_h0, d_c0):
    """Backpropagates through the recurrence (BPTT) for batch rows [r0, r1), in reverse time.

    Args:
        packed_t: `pack_backward(recurrent_kernel)`, [P, 4H, PANEL].
        mask, recurrent_mask, activation, recurrent_activation,
        zero_output_for_mask: as for `forward_steps`.
        c_seq: [N, T+1, H] and gates: [N, T, 4H], saved by `forward_steps`.
        d_outputs: [N, T, H] gradient of the outputs.
        d_h_n, d_c_n: [N, H] gradients of the final states.
        d_xw: [N, T, 4H] gradient of the input projection, written.
        d_h0, d_c0: [N, H] gradients of the initial states, written.
    """
    N, T, H = d_outputs.shape
    rows = r1 - r0
    panels = packed_t.shape[0]
    width = panels * PANEL
    masked_steps = mask.shape[1] > 0
    dropout = recurrent_mask.shape[0] > 0
    dh = np.empty((rows, H), np.float32)
    dc = np.empty((rows, H), np.float32)
    _copy(dh, d_h_n[r0:r1])
    _copy(dc, d_c_n[r0:r1])
    carried = np.zeros((rows, H), np.float32)
    groups = 4 if dropout else 1
    products = np.empty((groups * rows, width), np.float32)
    flat_d_xw = d_xw.reshape(N * T, 4 * H)
    flat_packed = packed_t.reshape(-1)
    for t in range(T - 1, -1, -1):
        for n in range(rows):
            row = r0 + n
            if masked_steps and not mask[row, t]:
                _masked_row_backward(row, t, n, d_outputs, carried, d_xw, zero_output_for_mask)
            else:
                _cell_row_backward(row, t, n, gates, c_seq, d_outputs, carried, dh, dc, d_xw,
                                   activation, recurrent_activation)
        panel_products(flat_d_xw, (r0 * T + t) * 4 * H, H if dropout else 0, T * 4 * H, rows,
                       H if dropout else 4 * H, flat_packed, H * PANEL if dropout else 0,
                       4 * H * PANEL, panels, products, rows * width, width, groups)
        for n in range(rows):
            if not masked_steps or mask[r0 + n, t]:
                _recurrent_grad_row(n, r0 + n, products, rows, recurrent_mask, dh)
    _copy(d_h0[r0:r1], dh)
    _copy(d_c0[r0:r1], dc)


@functools.lru_cache(maxsize=None)
def block_kernels(activation, recurrent_activation):
    """`(forward_block, backward_block)`: `forward_steps` and `backward_steps` for
    one activation pair, compiled with the pair's codes as constants."""

    @njit(**_KERNEL_OPTIONS)
    def forward_block(r0, r1, xw, packed, h0, c0, mask, recurrent_mask, zero_output_for_mask,
                      outputs, h_n, c_n, h_in, c_seq, gates):
        forward_steps(r0, r1, xw, packed, h0, c0, mask, recurrent_mask, activation,
                      recurrent_activation, zero_output_for_mask, outputs, h_n, c_n, h_in,
                      c_seq, gates)

    @njit(**_KERNEL_OPTIONS)
    def backward_block(r0, r1, packed_t, mask, recurrent_mask, zero_output_for_mask, c_seq,
                       gates, d_outputs, d_h_n, d_c_n, d_xw, d_h0, d_c0):
        backward_steps(r0, r1, packed_t, mask, recurrent_mask, activation, recurrent_activation,
                       zero_output_for_mask, c_seq, gates, d_outputs, d_h_n, d_c_n, d_xw,
                       d_h0, d_c0)

    return forward_block, backward_block


def forward(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, activation,
            recurrent_activation, zero_output_for_mask, training, out=None):
    """Runs `forward_steps` over blocks of rows, on NumPy arrays, batch-major.

    Args:
        xw: [N, T, 4H]; recurrent_kernel: [H, 4H]; h0, c0: [N, H].
        mask: [N, T] bool or None; recurrent_mask: [4, N, H] or None.
        training: save what `backward` needs.
        out: C-contiguous float32 arrays to write the results into (a framework's
            own buffers), in the order returned; allocated here when None.

    Returns:
        `(outputs [N, T, H], h_n, c_n, saved)`, with `saved = (h_in, c_seq,
        gates)` when training, else None; `h_in` [N, T, H] holds the state
        each step read, for the recurrent kernel's gradient.
    """
    N, T, H4 = xw.shape
    H = H4 // 4
    steps = T if training else 0
    shapes = [(N, T, H), (N, H), (N, H), (N, steps, H), (N, T + 1 if training else 0, H),
              (N, steps, H4)]
    outputs, h_n, c_n, h_in, c_seq, gates = _results(shapes, out)
    packed = pack_forward(_f32(recurrent_kernel))
    arguments = (
        _f32(xw), packed, _f32(h0), _f32(c0), _mask_or_empty(mask, N),
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
    """
    _, c_seq, gates = saved
    N, T, H = d_outputs.shape
    d_xw, d_h0, d_c0 = _results([(N, T, 4 * H), (N, H), (N, H)], out)
    arguments = (
        pack_backward(_f32(recurrent_kernel)), _mask_or_empty(mask, N),
        _recurrent_mask_or_empty(recurrent_mask, N, H), bool(zero_output_for_mask), c_seq,
        gates, _f32(d_outputs), _f32(d_h_n), _f32(d_c_n), d_xw, d_h0, d_c0)
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


def _f32(array):
    return np.ascontiguousarray(array, np.float32)


def _mask_or_empty(mask, N):
    if mask is None:
        return np.zeros((N, 0), np.bool_)
    return np.ascontiguousarray(mask, np.bool_)


def _recurrent_mask_or_empty(recurrent_mask, N, H):
    if recurrent_mask is None:
        return np.zeros((0, N, H), np.float32)
    return _f32(recurrent_mask)
