"""The fused LSTM recurrence on the CPU: forward and backward `njit` kernels.

The framework computes the input projection `xw = x @ kernel + bias` for all
timesteps in one matmul; these kernels run only the sequential part. Shapes use
T timesteps, N batch rows, H units; `xw` is time-major, gates in the column
order i, f, c, o.

Masking follows Keras: a masked step keeps `h` and `c` unchanged, and its
output is zero (`zero_output_for_mask`) or the last unmasked output (zero
before the first one). Recurrent dropout multiplies `h` by one mask per gate
before the recurrent product, as `keras.layers.LSTMCell` does.
"""

import numpy as np
from numba import njit

from .gates import compile_gates

_gates = compile_gates(njit(inline="always", error_model="numpy", cache=True))
_cell_forward = _gates.cell_forward
_cell_backward = _gates.cell_backward


@njit(error_model="numpy", cache=True)
def _gate_blocks(recurrent_kernel, transpose):
    """Splits [H, 4H] into four contiguous [H, H] blocks, transposed if asked."""
    H = recurrent_kernel.shape[0]
    blocks = np.empty((4, H, H), np.float32)
    for g in range(4):
        block = recurrent_kernel[:, g * H:(g + 1) * H]
        blocks[g] = block.T if transpose else block
    return blocks


@njit(error_model="numpy", cache=True)
def _recurrent_product(h, recurrent_kernel, blocks, recurrent_mask, z, masked_h, z_gate):
    """z[N, 4H] = h @ recurrent_kernel, with one dropout mask per gate if given."""
    if recurrent_mask.shape[0] == 0:
        np.dot(h, recurrent_kernel, z)
        return
    H = h.shape[1]
    for g in range(4):
        np.multiply(h, recurrent_mask[g], masked_h)
        np.dot(masked_h, blocks[g], z_gate)
        z[:, g * H:(g + 1) * H] = z_gate


@njit(error_model="numpy", cache=True)
def _recurrent_grad(dz, recurrent_kernel_t, blocks_t, recurrent_mask, dh, dz_gate, dh_gate):
    """dh[N, H] = dz @ recurrent_kernel.T, with the per-gate dropout masks if given."""
    if recurrent_mask.shape[0] == 0:
        np.dot(dz, recurrent_kernel_t, dh)
        return
    H = dh.shape[1]
    dh[:] = 0
    for g in range(4):
        dz_gate[:] = dz[:, g * H:(g + 1) * H]
        np.dot(dz_gate, blocks_t[g], dh_gate)
        dh += dh_gate * recurrent_mask[g]


@njit(nogil=True, error_model="numpy", cache=True)
def lstm_forward(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, activation,
                 recurrent_activation, zero_output_for_mask,
                 outputs, h_n, c_n, h_seq, c_seq, gates):
    """Runs the LSTM recurrence over all timesteps.

    Args:
        xw: [T, N, 4H] input projection, bias included.
        recurrent_kernel: [H, 4H].
        h0, c0: [N, H] initial states.
        mask: [T, N] bool, or [0, N] for no mask.
        recurrent_mask: [4, N, H] recurrent dropout masks, or [0, N, H].
        activation, recurrent_activation: codes from `gates.ACTIVATION_CODES`.
        zero_output_for_mask: masked steps output zeros instead of the last
            unmasked output.
        outputs: [T, N, H], written.
        h_n, c_n: [N, H] final states, written.
        h_seq, c_seq: [T+1, N, H] states with slot 0 the initial state,
            written when training, else [0, N, H].
        gates: [T, N, 4H] gate activations i, f, g, o, written when
            training, else [0, N, 4H].
    """
    T, N, H = outputs.shape
    masked = mask.shape[0] > 0
    save = gates.shape[0] > 0
    h = h0.copy()
    c = c0.copy()
    z = np.empty((N, 4 * H), np.float32)
    masked_h = np.empty((N, H), np.float32)
    z_gate = np.empty((N, H), np.float32)
    blocks = _gate_blocks(recurrent_kernel, False)
    if save:
        h_seq[0] = h
        c_seq[0] = c
    for t in range(T):
        _recurrent_product(h, recurrent_kernel, blocks, recurrent_mask, z, masked_h, z_gate)
        for n in range(N):
            if masked and not mask[t, n]:
                for j in range(H):
                    keep_last = t > 0 and not zero_output_for_mask
                    outputs[t, n, j] = outputs[t - 1, n, j] if keep_last else 0
                if save:
                    gates[t, n] = 0
                continue
            for j in range(H):
                i, f, g, o, c_new, h_new = _cell_forward(
                    xw[t, n, j] + z[n, j],
                    xw[t, n, H + j] + z[n, H + j],
                    xw[t, n, 2 * H + j] + z[n, 2 * H + j],
                    xw[t, n, 3 * H + j] + z[n, 3 * H + j],
                    c[n, j], activation, recurrent_activation)
                c[n, j] = c_new
                h[n, j] = h_new
                outputs[t, n, j] = h_new
                if save:
                    gates[t, n, j] = i
                    gates[t, n, H + j] = f
                    gates[t, n, 2 * H + j] = g
                    gates[t, n, 3 * H + j] = o
        if save:
            h_seq[t + 1] = h
            c_seq[t + 1] = c
    h_n[:] = h
    c_n[:] = c


@njit(nogil=True, error_model="numpy", cache=True)
def lstm_backward(recurrent_kernel, mask, recurrent_mask, activation,
                  recurrent_activation, zero_output_for_mask,
                  c_seq, gates, d_outputs, d_h_n, d_c_n,
                  d_xw, d_h0, d_c0):
    """Backpropagates through the recurrence (BPTT), in reverse time.

    Args:
        recurrent_kernel, mask, recurrent_mask, activation,
        recurrent_activation, zero_output_for_mask: as for `lstm_forward`.
        c_seq: [T+1, N, H] and gates: [T, N, 4H], saved by `lstm_forward`.
        d_outputs: [T, N, H] gradient of the outputs.
        d_h_n, d_c_n: [N, H] gradients of the final states.
        d_xw: [T, N, 4H] gradient of the input projection, written.
        d_h0, d_c0: [N, H] gradients of the initial states, written.
    """
    T, N, H = d_outputs.shape
    masked = mask.shape[0] > 0
    dh = d_h_n.copy()
    dc = d_c_n.copy()
    carried = np.zeros((N, H), np.float32)
    dh_rec = np.empty((N, H), np.float32)
    dz_gate = np.empty((N, H), np.float32)
    dh_gate = np.empty((N, H), np.float32)
    recurrent_kernel_t = np.ascontiguousarray(recurrent_kernel.T)
    blocks_t = _gate_blocks(recurrent_kernel, True)
    for t in range(T - 1, -1, -1):
        for n in range(N):
            if masked and not mask[t, n]:
                d_xw[t, n] = 0
                for j in range(H):
                    if zero_output_for_mask:
                        carried[n, j] = 0
                    else:
                        carried[n, j] += d_outputs[t, n, j]
                continue
            for j in range(H):
                dzi, dzf, dzc, dzo, dc_prev = _cell_backward(
                    gates[t, n, j], gates[t, n, H + j],
                    gates[t, n, 2 * H + j], gates[t, n, 3 * H + j],
                    c_seq[t, n, j], c_seq[t + 1, n, j],
                    d_outputs[t, n, j] + carried[n, j] + dh[n, j], dc[n, j],
                    activation, recurrent_activation)
                d_xw[t, n, j] = dzi
                d_xw[t, n, H + j] = dzf
                d_xw[t, n, 2 * H + j] = dzc
                d_xw[t, n, 3 * H + j] = dzo
                dc[n, j] = dc_prev
                carried[n, j] = 0
        _recurrent_grad(d_xw[t], recurrent_kernel_t, blocks_t, recurrent_mask,
                        dh_rec, dz_gate, dh_gate)
        for n in range(N):
            if not masked or mask[t, n]:
                dh[n] = dh_rec[n]
    d_h0[:] = dh
    d_c0[:] = dc


_ROWS_PER_CHUNK = 64
_COLUMNS_PER_BLOCK = 128


@njit(nogil=True, error_model="numpy", cache=True)
def accumulate_outer(a, b, out):
    """out[K1, K2] = a.T @ b for a [R, K1] and b [R, K2], summed in float64.

    Weight gradients sum over all T * N rows. One float32 GEMM per chunk of 64
    rows, accumulated in float64 across chunks, keeps their error at the level
    of the per-step sums the stock layer makes; one long float32 GEMM does not.
    Columns go in blocks so that the float64 accumulator stays in cache.
    """
    K1 = a.shape[1]
    for c0 in range(0, b.shape[1], _COLUMNS_PER_BLOCK):
        c1 = min(c0 + _COLUMNS_PER_BLOCK, b.shape[1])
        b_block = np.ascontiguousarray(b[:, c0:c1])
        acc = np.zeros((K1, c1 - c0), np.float64)
        part = np.empty((K1, c1 - c0), np.float32)
        for r0 in range(0, a.shape[0], _ROWS_PER_CHUNK):
            r1 = min(r0 + _ROWS_PER_CHUNK, a.shape[0])
            np.dot(a[r0:r1].T, b_block[r0:r1], part)
            acc += part
        out[:, c0:c1] = acc


def forward(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, activation,
            recurrent_activation, zero_output_for_mask, training):
    """Host driver for `lstm_forward` on NumPy arrays.

    Args:
        mask: [T, N] bool or None; recurrent_mask: [4, N, H] or None.
        training: save what `backward` needs.

    Returns:
        `(outputs, h_n, c_n, saved)`, with `saved = (h_seq, c_seq, gates)`
        when training, else None.
    """
    T, N, H4 = xw.shape
    H = H4 // 4
    f32 = np.float32
    steps = T if training else 0
    outputs = np.empty((T, N, H), f32)
    h_n = np.empty((N, H), f32)
    c_n = np.empty((N, H), f32)
    h_seq = np.empty((steps + 1 if training else 0, N, H), f32)
    c_seq = np.empty_like(h_seq)
    gates = np.empty((steps, N, H4), f32)
    lstm_forward(
        np.ascontiguousarray(xw, f32), np.ascontiguousarray(recurrent_kernel, f32),
        np.ascontiguousarray(h0, f32), np.ascontiguousarray(c0, f32),
        _mask_or_empty(mask, N), _recurrent_mask_or_empty(recurrent_mask, N, H),
        activation, recurrent_activation, bool(zero_output_for_mask),
        outputs, h_n, c_n, h_seq, c_seq, gates)
    saved = (h_seq, c_seq, gates) if training else None
    return outputs, h_n, c_n, saved


def backward(recurrent_kernel, mask, recurrent_mask, activation, recurrent_activation,
             zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n):
    """Host driver for `lstm_backward` on NumPy arrays.

    Returns:
        `(d_xw, d_h0, d_c0)`.
    """
    _, c_seq, gates = saved
    T, N, H = d_outputs.shape
    f32 = np.float32
    d_xw = np.empty((T, N, 4 * H), f32)
    d_h0 = np.empty((N, H), f32)
    d_c0 = np.empty((N, H), f32)
    lstm_backward(
        np.ascontiguousarray(recurrent_kernel, f32), _mask_or_empty(mask, N),
        _recurrent_mask_or_empty(recurrent_mask, N, H),
        activation, recurrent_activation, bool(zero_output_for_mask),
        c_seq, gates, np.ascontiguousarray(d_outputs, f32),
        np.ascontiguousarray(d_h_n, f32), np.ascontiguousarray(d_c_n, f32),
        d_xw, d_h0, d_c0)
    return d_xw, d_h0, d_c0


def gradients(x, kernel, recurrent_kernel, mask, input_mask, recurrent_mask, activation,
              recurrent_activation, zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n):
    """All gradients of the layer's sequence op: projection and recurrence.

    Args:
        x: [T, N, C] inputs (time-major, before input dropout).
        kernel: [C, 4H]; input_mask: [4, N, C] per-gate input dropout or None.
        Others: as for `backward`.

    Returns:
        `(d_x, d_kernel, d_bias, d_recurrent_kernel, d_h0, d_c0)`.
    """
    d_xw, d_h0, d_c0 = backward(
        recurrent_kernel, mask, recurrent_mask, activation, recurrent_activation,
        zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n)
    x = np.asarray(x, np.float32)
    d_kernel = _gate_weight_grad(x, d_xw, input_mask)
    d_recurrent_kernel = _gate_weight_grad(saved[0][:-1], d_xw, recurrent_mask)
    d_bias = d_xw.reshape(-1, d_xw.shape[-1]).sum(0, dtype=np.float64).astype(np.float32)
    d_x = _input_grad(d_xw, np.asarray(kernel, np.float32), input_mask)
    return d_x, d_kernel, d_bias, d_recurrent_kernel, d_h0, d_c0


def _gate_weight_grad(inputs, d_xw, masks):
    """[K, 4H] = sum over steps and rows of (inputs * mask_g).T @ d_xw_g per gate g."""
    K = inputs.shape[-1]
    H = d_xw.shape[-1] // 4
    out = np.empty((K, 4 * H), np.float32)
    if masks is None:
        accumulate_outer(inputs.reshape(-1, K), d_xw.reshape(-1, 4 * H), out)
        return out
    block = np.empty((K, H), np.float32)
    for g in range(4):
        masked = np.ascontiguousarray(inputs * masks[g]).reshape(-1, K)
        d_gate = np.ascontiguousarray(d_xw[..., g * H:(g + 1) * H]).reshape(-1, H)
        accumulate_outer(masked, d_gate, block)
        out[:, g * H:(g + 1) * H] = block
    return out


def _input_grad(d_xw, kernel, masks):
    """[T, N, C] gradient of the inputs through the projection."""
    if masks is None:
        return d_xw @ kernel.T
    H = kernel.shape[1] // 4
    return sum((d_xw[..., g * H:(g + 1) * H] @ kernel[:, g * H:(g + 1) * H].T) * masks[g]
               for g in range(4))


def _mask_or_empty(mask, N):
    if mask is None:
        return np.zeros((0, N), np.bool_)
    return np.ascontiguousarray(mask, np.bool_)


def _recurrent_mask_or_empty(recurrent_mask, N, H):
    if recurrent_mask is None:
        return np.zeros((0, N, H), np.float32)
    return np.ascontiguousarray(recurrent_mask, np.float32)
