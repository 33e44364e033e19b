"""The fused LSTM layer on the CPU: forward and backward `njit` step kernels.

The kernels own the whole layer: the forward one computes the input
projection `x @ kernel + bias` itself, and the backward one the input and
weight gradients, so that no [N, T, 4H] projection or its gradient ever
exists in memory. Arrays are batch-major, as Keras holds them: N batch rows,
T timesteps, C input features, H units, gates in the column order i, f, c, o.

Rows of a batch never interact, so the batch is cut into blocks of rows and
each block runs the whole sequence on its own, in a thread of its own: no
barrier between timesteps, and a slow or busy core holds up only the block it
runs while the other threads take the remaining blocks. Each step of a block
is one register-blocked product of its hidden states with the recurrent
kernel, packed in panels of `panels.PANEL` columns (`panels`, `tile`), then
the cell math on each row while the products are still in cache.

Time runs in chunks of `chunk_steps` steps, small enough that a chunk's
projection [steps x rows, 4H] stays in cache (backward: `backward_chunk_steps`,
deep enough for the weight gradients): at the first step of a chunk
the forward kernel projects the chunk's inputs with the same tile
(`project_inputs`); after the last step of a chunk (in reverse time) the
backward kernel turns the chunk's projection gradient into the input gradient
(`input_gradients`) and adds it into the block's weight gradients
(`weight_gradients`), which the driver sums over the blocks. Both phases take
a range [p0, p1) of the panels they write.

Masking follows Keras: a masked step keeps `h` and `c` unchanged, and its
output is zero (`zero_output_for_mask`) or the last unmasked output (zero
before the first one). Dropout multiplies the inputs and `h` by one mask per
gate before the input and recurrent products, as `keras.layers.LSTMCell` does.

Activation codes are compile-time constants: `block_kernels` closes the
kernels over one activation pair, which Numba freezes into the machine code
and keys its disk cache on, so a process compiles (or loads) only the pairs
it uses, and inference never compiles the backward kernel.
"""

import functools

import numpy as np
from numba import njit

from ..gates import compile_gates
from .panels import PANEL, pack_gate_rows, panel_accumulate, panel_products

_gates = compile_gates(njit(inline="always", error_model="numpy", cache=True),
                       leaf_jit=njit(error_model="numpy", cache=True))
_cell_forward = _gates.cell_forward
_cell_backward = _gates.cell_backward

_KERNEL_OPTIONS = {"nogil": True, "error_model": "numpy", "cache": True}

# Floats of a chunk's projection (or its gradient): 512 KB, within a core's L2.
CHUNK_FLOATS = 1 << 17
# Least depth (rows x steps) of a backward chunk's weight-gradient products: each
# chunk reads and writes the block's [C + H, 4H] gradients once, from L3 at S3
# (measured at S3 on one thread: the backward 10% faster than with 64).
WEIGHT_GRADIENT_DEPTH = 256


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
def chunk_steps(rows, width, T):
    """Timesteps per chunk: `CHUNK_FLOATS` of projection for `rows` rows of 4 gates of
    `width` columns, at least 1 and at most T."""
    return max(1, min(T, CHUNK_FLOATS // (rows * 4 * width)))


@njit(inline="always", error_model="numpy", cache=True)
def backward_chunk_steps(rows, width, T):
    """Timesteps per backward chunk: `chunk_steps`, or more for a weight-gradient depth
    of `WEIGHT_GRADIENT_DEPTH` rows x steps, at most T."""
    return max(chunk_steps(rows, width, T), min(T, -(-WEIGHT_GRADIENT_DEPTH // rows)))


@njit(nogil=True, error_model="numpy", cache=True)
def _gather_rows(src, masks, r0, rows, t0, count, group_rows, dst):
    """`dst[g * group_rows + m] = src[r0 + n, t0 + s] * masks[g, r0 + n]` for the `count`
    chunk rows m = s * rows + n; one group, unmasked, when `masks` is [0, N, K]."""
    K = src.shape[2]
    for m in range(count):
        row = r0 + m % rows
        t = t0 + m // rows
        if masks.shape[0] == 0:
            for k in range(K):
                dst[m, k] = src[row, t, k]
        else:
            for g in range(4):
                for k in range(K):
                    dst[g * group_rows + m, k] = src[row, t, k] * masks[g, row, k]


@njit(nogil=True, error_model="numpy", cache=True)
def _gather_columns(src, masks, r0, rows, t0, count, dst):
    """The transpose of `_gather_rows`: `dst[g * K + k, m] = src[r0 + n, t0 + s, k] *
    masks[g, r0 + n, k]`."""
    K = src.shape[2]
    for m in range(count):
        row = r0 + m % rows
        t = t0 + m // rows
        if masks.shape[0] == 0:
            for k in range(K):
                dst[k, m] = src[row, t, k]
        else:
            for g in range(4):
                for k in range(K):
                    dst[g * K + k, m] = src[row, t, k] * masks[g, row, k]


@njit(nogil=True, error_model="numpy", cache=True)
def project_inputs(inputs, count, group_rows, flat_kernel, p0, p1, xw):
    """`xw[m, gate g, panels p0..p1) = inputs[group g, m] @ kernel[:, gate g]` for the
    `count` rows of a chunk.

    Args:
        inputs: [G * group_rows, C] the chunk's inputs from `_gather_rows`, G = 4
            groups (one per gate, input dropout) or 1.
        flat_kernel: `pack_forward(kernel)` [4, P, C, PANEL], flattened.
        xw: [group_rows, 4 * P * PANEL], gate g in columns from g * P * PANEL.
    """
    C = inputs.shape[1]
    width = xw.shape[1] // 4
    panels = width // PANEL
    dropout = inputs.shape[0] > group_rows
    panel_products(inputs, 0, group_rows * C if dropout else 0, C, count, C, flat_kernel,
                   panels * C * PANEL, C * PANEL, p0, p1, xw, width, 4 * width, 4)


@njit(inline="always", error_model="numpy", cache=True)
def _cell_row_forward(xw, m, bias, z, n, width, c, h, row, t, outputs, gates, activation,
                      recurrent_activation):
    """The cell update of one row: pre-activations `xw[m] + z[n] + bias`, carry
    `c[n]` updated in place, new hidden state into `h[n]` and `outputs[row, t]`,
    gate activations into `gates[row, t]` when it has steps.

    Plain indexing, no array views: a view per row would take and release a
    reference on the shared arrays, an atomic operation every thread contends on.
    """
    H = c.shape[1]
    save = gates.shape[1] > 0
    for k in range(H):
        i, f, g, o, c_new, h_new = _cell_forward(
            xw[m, k] + z[n, k] + bias[k],
            xw[m, width + k] + z[n, width + k] + bias[H + k],
            xw[m, 2 * width + k] + z[n, 2 * width + k] + bias[2 * H + k],
            xw[m, 3 * width + k] + z[n, 3 * width + k] + bias[3 * H + k], c[n, k],
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
def forward_steps(r0, r1, x, packed_kernel, bias, packed, h0, c0, mask, input_mask,
                  recurrent_mask, activation, recurrent_activation, zero_output_for_mask,
                  outputs, h_n, c_n, h_in, c_seq, gates):
    """Runs the layer over all T timesteps for batch rows [r0, r1).

    Args:
        r0, r1: the block's rows.
        x: [N, T, C] inputs.
        packed_kernel: `pack_forward(kernel)`, [4, P, C, PANEL].
        bias: [4H].
        packed: `pack_forward(recurrent_kernel)`, [4, P, H, PANEL].
        h0, c0: [N, H] initial states.
        mask: [N, T] bool, or [N, 0] for no mask.
        input_mask: [4, N, C] input dropout masks, or [0, N, C].
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
    steps = chunk_steps(rows, width, T)
    flat_packed = packed.reshape(-1)
    flat_kernel = packed_kernel.reshape(-1)
    inputs = np.empty(((4 if input_mask.shape[0] > 0 else 1) * steps * rows, x.shape[2]),
                      np.float32)
    xw = np.empty((steps * rows, 4 * width), np.float32)
    z = np.empty((rows, 4 * width), np.float32)
    h = np.empty((2, rows, H), np.float32)
    _copy(h[0], h0[r0:r1])
    c = np.empty((rows, H), np.float32)
    _copy(c, c0[r0:r1])
    dropped = np.empty((4 * rows if dropout else rows, H), np.float32)
    for t in range(T):
        src = h[t % 2]
        dst = h[(t + 1) % 2]
        if t % steps == 0:
            count = (min(T, t + steps) - t) * rows
            _gather_rows(x, input_mask, r0, rows, t, count, steps * rows, inputs)
            project_inputs(inputs, count, steps * rows, flat_kernel, 0, panels, xw)
        if training:
            _copy(h_in[r0:r1, t], src)
            _copy(c_seq[r0:r1, t], c)
        if dropout:
            for g in range(4):
                np.multiply(src, recurrent_mask[g, r0:r1], dropped[g * rows:(g + 1) * rows])
        panel_products(dropped if dropout else src, 0, rows * H if dropout else 0, H, rows, H,
                       flat_packed, panels * H * PANEL, H * PANEL, 0, panels, z, width,
                       4 * width, 4)
        for n in range(rows):
            row = r0 + n
            if masked_steps and not mask[row, t]:
                _masked_row_forward(row, t, n, src, dst, outputs, gates, zero_output_for_mask)
            else:
                _cell_row_forward(xw, (t % steps) * rows + n, bias, z, n, width, c, dst, row, t,
                                  outputs, gates, activation, recurrent_activation)
    _copy(h_n[r0:r1], h[T % 2])
    _copy(c_n[r0:r1], c)
    if training:
        _copy(c_seq[r0:r1, T], c)


@njit(inline="always", error_model="numpy", cache=True)
def _cell_row_backward(row, t, n, m, gates, c_seq, d_outputs, carried, dh, dc, d_xw, activation,
                       recurrent_activation):
    """Gradients of the cell update of one row: chunk row `d_xw[m]` written, `dc[n]`
    becomes the previous carry's gradient, `carried[n]` is consumed. Plain
    indexing, as in `_cell_row_forward`."""
    H = dh.shape[1]
    for k in range(H):
        d_xw[m, k], d_xw[m, H + k], d_xw[m, 2 * H + k], d_xw[m, 3 * H + k], dc[n, k] = \
            _cell_backward(
                gates[row, t, k], gates[row, t, H + k], gates[row, t, 2 * H + k],
                gates[row, t, 3 * H + k], c_seq[row, t, k], c_seq[row, t + 1, k],
                d_outputs[row, t, k] + carried[n, k] + dh[n, k], dc[n, k],
                activation, recurrent_activation)
        carried[n, k] = 0


@njit(inline="always", error_model="numpy", cache=True)
def _masked_row_backward(row, t, n, m, d_outputs, carried, d_xw, zero_output_for_mask):
    """A masked step of one row: no gate gradient; its output's gradient is carried
    to the last unmasked output, or dropped with `zero_output_for_mask`."""
    for k in range(d_xw.shape[1]):
        d_xw[m, k] = 0
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


@njit(nogil=True, error_model="numpy", cache=True)
def input_gradients(d_xw, count, flat_kernel_t, p0, p1, products, input_mask, r0, rows, t0,
                    d_x):
    """`d_x` of a chunk's `count` rows: `sum_g (d_xw_g @ kernel_g^T) * input_mask[g]`, for
    the input columns of panels [p0, p1).

    Args:
        d_xw: [L, 4H] the chunk's projection gradient, chunk row m = s * rows + n for
            step t0 + s of batch row r0 + n.
        flat_kernel_t: `pack_backward(kernel)` [Q, 4H, PANEL], flattened.
        products: [L, G * Q * PANEL] scratch, G = 4 with input dropout, else 1.
        input_mask: [4, N, C] or [0, N, C].
        d_x: [N, T, C], written.
    """
    H4 = d_xw.shape[1]
    H = H4 // 4
    C = d_x.shape[2]
    dropout = input_mask.shape[0] > 0
    groups = 4 if dropout else 1
    width = products.shape[1] // groups
    panel_products(d_xw, 0, H if dropout else 0, H4, count, H if dropout else H4,
                   flat_kernel_t, H * PANEL if dropout else 0, H4 * PANEL, p0, p1, products,
                   width, groups * width, groups)
    k1 = min(C, p1 * PANEL)
    for m in range(count):
        row = r0 + m % rows
        t = t0 + m // rows
        if dropout:
            for k in range(p0 * PANEL, k1):
                d_x[row, t, k] = (products[m, k] * input_mask[0, row, k]
                                  + products[m, width + k] * input_mask[1, row, k]
                                  + products[m, 2 * width + k] * input_mask[2, row, k]
                                  + products[m, 3 * width + k] * input_mask[3, row, k])
        else:
            for k in range(p0 * PANEL, k1):
                d_x[row, t, k] = products[m, k]


@njit(nogil=True, error_model="numpy", cache=True)
def weight_gradients(x_t, h_t, count, packed_d, d_xw, p0, p1, d_kernel, d_recurrent_kernel,
                     d_bias):
    """Adds a chunk's `count` rows into the weight gradients of the panels [p0, p1).

    Args:
        x_t: [G * C, L] and h_t: [G * H, L]: the chunk's inputs and read states
            transposed (`_gather_columns`), one group per gate with dropout (G = 4).
        packed_d: [4, P, L, PANEL] the chunk's projection gradient (`pack_gate_rows`).
        d_xw: [L, 4H] the same, row-major, for the bias.
        d_kernel: [C, 4 * P * PANEL] and d_recurrent_kernel [H, 4 * P * PANEL],
            gate g in columns from g * P * PANEL, and d_bias [4H]: added into.
    """
    panels = packed_d.shape[1]
    L = packed_d.shape[2]
    width = panels * PANEL
    H = d_xw.shape[1] // 4
    flat_d = packed_d.reshape(-1)
    for a_t, grad in ((x_t, d_kernel), (h_t, d_recurrent_kernel)):
        K = grad.shape[0]
        panel_accumulate(a_t, 0, K * L if a_t.shape[0] > K else 0, L, K, count, flat_d,
                         panels * L * PANEL, L * PANEL, p0, p1, grad, width, 4 * width, 4)
    k1 = min(H, p1 * PANEL)
    for m in range(count):
        for g in range(4):
            for k in range(p0 * PANEL, k1):
                d_bias[g * H + k] += d_xw[m, g * H + k]


@njit(inline="always", error_model="numpy", cache=True)
def backward_steps(r0, r1, x, packed_kernel_t, packed_t, mask, input_mask, recurrent_mask,
                   activation, recurrent_activation, zero_output_for_mask, h_in, c_seq, gates,
                   d_outputs, d_h_n, d_c_n, d_x, d_kernel, d_recurrent_kernel, d_bias, d_h0,
                   d_c0):
    """Backpropagates through the layer (BPTT) for batch rows [r0, r1), in reverse time.

    Args:
        x, mask, input_mask, recurrent_mask, activation, recurrent_activation,
        zero_output_for_mask: as for `forward_steps`.
        packed_kernel_t: `pack_backward(kernel)`, [Q, 4H, PANEL].
        packed_t: `pack_backward(recurrent_kernel)`, [P, 4H, PANEL].
        h_in: [N, T, H], c_seq: [N, T+1, H] and gates: [N, T, 4H], saved by
            `forward_steps`.
        d_outputs: [N, T, H] gradient of the outputs.
        d_h_n, d_c_n: [N, H] gradients of the final states.
        d_x: [N, T, C] gradient of the inputs, written.
        d_kernel: [C, 4 * P * PANEL], d_recurrent_kernel: [H, 4 * P * PANEL] (gate g
            in columns from g * P * PANEL) and d_bias: [4H], this block's weight
            gradients, added into.
        d_h0, d_c0: [N, H] gradients of the initial states, written.
    """
    N, T, H = d_outputs.shape
    C = x.shape[2]
    rows = r1 - r0
    panels = packed_t.shape[0]
    width = panels * PANEL
    masked_steps = mask.shape[1] > 0
    dropout = recurrent_mask.shape[0] > 0
    steps = backward_chunk_steps(rows, width, T)
    L = steps * rows
    input_groups = 4 if input_mask.shape[0] > 0 else 1
    dh = np.empty((rows, H), np.float32)
    dc = np.empty((rows, H), np.float32)
    _copy(dh, d_h_n[r0:r1])
    _copy(dc, d_c_n[r0:r1])
    carried = np.zeros((rows, H), np.float32)
    groups = 4 if dropout else 1
    products = np.empty((groups * rows, width), np.float32)
    d_xw = np.empty((L, 4 * H), np.float32)
    packed_d = np.zeros((4, panels, L, PANEL), np.float32)
    x_products = np.empty((L, input_groups * packed_kernel_t.shape[0] * PANEL), np.float32)
    x_t = np.empty((input_groups * C, L), np.float32)
    h_t = np.empty((groups * H, L), np.float32)
    flat_packed = packed_t.reshape(-1)
    flat_kernel_t = packed_kernel_t.reshape(-1)
    for t in range(T - 1, -1, -1):
        m0 = (t % steps) * rows
        for n in range(rows):
            row = r0 + n
            if masked_steps and not mask[row, t]:
                _masked_row_backward(row, t, n, m0 + n, d_outputs, carried, d_xw,
                                     zero_output_for_mask)
            else:
                _cell_row_backward(row, t, n, m0 + n, gates, c_seq, d_outputs, carried, dh, dc,
                                   d_xw, activation, recurrent_activation)
        pack_gate_rows(d_xw, m0, rows, packed_d)
        panel_products(d_xw, m0 * 4 * H, H if dropout else 0, 4 * H, rows,
                       H if dropout else 4 * H, flat_packed, H * PANEL if dropout else 0,
                       4 * H * PANEL, 0, panels, products, rows * width, width, groups)
        for n in range(rows):
            if not masked_steps or mask[r0 + n, t]:
                _recurrent_grad_row(n, r0 + n, products, rows, recurrent_mask, dh)
        if m0 == 0:
            count = (min(T, t + steps) - t) * rows
            input_gradients(d_xw, count, flat_kernel_t, 0, packed_kernel_t.shape[0], x_products,
                            input_mask, r0, rows, t, d_x)
            _gather_columns(x, input_mask, r0, rows, t, count, x_t)
            _gather_columns(h_in, recurrent_mask, r0, rows, t, count, h_t)
            weight_gradients(x_t, h_t, count, packed_d, d_xw, 0, panels, d_kernel,
                             d_recurrent_kernel, d_bias)
    _copy(d_h0[r0:r1], dh)
    _copy(d_c0[r0:r1], dc)


@functools.lru_cache(maxsize=None)
def block_kernels(activation, recurrent_activation):
    """`(forward_block, backward_block)`: `forward_steps` and `backward_steps` for
    one activation pair, compiled with the pair's codes as constants.

    `backward_block` adds block `r0 // block_size`'s weight gradients into that
    block's slot of `d_kernel_parts` [B, C, 4 * P * PANEL], `d_recurrent_parts`
    [B, H, 4 * P * PANEL] and `d_bias_parts` [B, 4H].
    """

    @njit(**_KERNEL_OPTIONS)
    def forward_block(r0, r1, x, packed_kernel, bias, packed, h0, c0, mask, input_mask,
                      recurrent_mask, zero_output_for_mask, outputs, h_n, c_n, h_in, c_seq,
                      gates):
        forward_steps(r0, r1, x, packed_kernel, bias, packed, h0, c0, mask, input_mask,
                      recurrent_mask, activation, recurrent_activation, zero_output_for_mask,
                      outputs, h_n, c_n, h_in, c_seq, gates)

    @njit(**_KERNEL_OPTIONS)
    def backward_block(r0, r1, block_size, x, packed_kernel_t, packed_t, mask, input_mask,
                       recurrent_mask, zero_output_for_mask, h_in, c_seq, gates, d_outputs,
                       d_h_n, d_c_n, d_x, d_kernel_parts, d_recurrent_parts, d_bias_parts,
                       d_h0, d_c0):
        block = r0 // block_size
        backward_steps(r0, r1, x, packed_kernel_t, packed_t, mask, input_mask, recurrent_mask,
                       activation, recurrent_activation, zero_output_for_mask, h_in, c_seq,
                       gates, d_outputs, d_h_n, d_c_n, d_x, d_kernel_parts[block],
                       d_recurrent_parts[block], d_bias_parts[block], d_h0, d_c0)

    return forward_block, backward_block
