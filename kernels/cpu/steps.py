"""The fused LSTM recurrence on the CPU: forward and backward `njit` step kernels.

The framework computes the input projection `xw = x @ kernel + bias` for all
timesteps in one matmul and the weight gradients from what these kernels
return (`fusedlstm.backends.projection`); the kernels run only the sequential part. Arrays are batch-major, as
Keras holds them: N batch rows, T timesteps, H units, gates in the column
order i, f, c, o.

Rows of a batch never interact, so the batch is cut into blocks of rows and
each block runs the whole sequence on its own, in a thread of its own: no
barrier between timesteps, and a slow or busy core holds up only the block it
runs while the other threads take the remaining blocks. Each step of a block
is one register-blocked product of its hidden states with the recurrent
kernel, packed in panels of `panels.PANEL` columns (`panels`, `tile`), then
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

import functools

import numpy as np
from numba import njit

from ..gates import compile_gates
from .panels import PANEL, panel_products

_gates = compile_gates(njit(inline="always", error_model="numpy", cache=True),
                       leaf_jit=njit(error_model="numpy", cache=True))
_cell_forward = _gates.cell_forward
_cell_backward = _gates.cell_backward

_KERNEL_OPTIONS = {"nogil": True, "error_model": "numpy", "cache": True}


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
