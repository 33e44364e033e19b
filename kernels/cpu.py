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

import numba
import numpy as np
import threadpoolctl
from numba import njit, prange

from .gates import compile_gates

# Kernels run inside framework callbacks, possibly from several threads at once:
# Numba's default workqueue layer aborts on concurrent parallel regions.
numba.config.THREADING_LAYER = "threadsafe"

_gates = compile_gates(njit(inline="always", error_model="numpy", cache=True))
_cell_forward = _gates.cell_forward
_cell_backward = _gates.cell_backward


@njit(error_model="numpy", cache=True)
def _pack_columns(recurrent_kernel, parts):
    """[parts, 4, H, width]: part p's columns of each gate block of [H, 4H].

    Part p owns hidden units [p * width, (p + 1) * width); columns past H stay zero.
    """
    H = recurrent_kernel.shape[0]
    width = -(-H // parts)
    packed = np.zeros((parts, 4, H, width), np.float32)
    for p in range(parts):
        j0 = p * width
        j1 = min(j0 + width, H)
        for g in range(4):
            packed[p, g, :, :j1 - j0] = recurrent_kernel[:, g * H + j0:g * H + j1]
    return packed


@njit(error_model="numpy", cache=True)
def _pack_rows_transposed(recurrent_kernel, parts):
    """[parts, 4H, width]: part p's rows of [H, 4H], transposed.

    `d_xw[t] @ packed[p]` is then the recurrent gradient of part p's units.
    """
    H = recurrent_kernel.shape[0]
    width = -(-H // parts)
    packed = np.zeros((parts, 4 * H, width), np.float32)
    for p in range(parts):
        j0 = p * width
        j1 = min(j0 + width, H)
        packed[p, :, :j1 - j0] = recurrent_kernel[j0:j1].T
    return packed


@njit(error_model="numpy", cache=True)
def _forward_part(p, t, xw, packed, h_src, h_dst, c, mask, recurrent_mask,
                  activation, recurrent_activation, zero_output_for_mask,
                  outputs, gates, z, masked_h):
    """One timestep for part p's hidden units: its recurrent product, then its gates.

    Reads all of `h_src` [N, H]; writes only part p's columns of `h_dst`, `c`,
    `outputs[t]` and `gates[t]`.
    """
    N, H = h_src.shape
    width = packed.shape[3]
    j0 = p * width
    j1 = min(j0 + width, H)
    for g in range(4):
        if recurrent_mask.shape[0] > 0:
            np.multiply(h_src, recurrent_mask[g], masked_h)
            np.dot(masked_h, packed[p, g], z[g])
        else:
            np.dot(h_src, packed[p, g], z[g])
    w = j1 - j0
    save = gates.shape[0] > 0
    for n in range(N):
        if mask.shape[0] > 0 and not mask[t, n]:
            keep_last = t > 0 and not zero_output_for_mask
            for j in range(j0, j1):
                h_dst[n, j] = h_src[n, j]
                outputs[t, n, j] = outputs[t - 1, n, j] if keep_last else 0
                if save:
                    for g in range(4):
                        gates[t, n, g * H + j] = 0
            continue
        _cell_rows_forward(
            xw[t, n, j0:j1], xw[t, n, H + j0:H + j1],
            xw[t, n, 2 * H + j0:2 * H + j1], xw[t, n, 3 * H + j0:3 * H + j1],
            z[0, n, :w], z[1, n, :w], z[2, n, :w], z[3, n, :w],
            c[n, j0:j1], h_dst[n, j0:j1], outputs[t, n, j0:j1],
            activation, recurrent_activation)
        if save:
            for g in range(4):
                gates[t, n, g * H + j0:g * H + j1] = z[g, n, :w]


@njit(error_model="numpy", cache=True)
def _cell_rows_forward(xi, xf, xc, xo, zi, zf, zc, zo, c, h, out,
                       activation, recurrent_activation):
    """The cell update on [W] rows: pre-activations `x + z`, carry `c` updated in
    place, new hidden state into `h` and `out`, gate activations back into `z`.

    Contiguous one-dimensional rows are what lets LLVM vectorize the gate math.
    """
    for k in range(c.shape[0]):
        i, f, g, o, c_new, h_new = _cell_forward(
            xi[k] + zi[k], xf[k] + zf[k], xc[k] + zc[k], xo[k] + zo[k], c[k],
            activation, recurrent_activation)
        zi[k] = i
        zf[k] = f
        zc[k] = g
        zo[k] = o
        c[k] = c_new
        h[k] = h_new
        out[k] = h_new


@njit(nogil=True, parallel=True, error_model="numpy", cache=True)
def lstm_forward(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, activation,
                 recurrent_activation, zero_output_for_mask,
                 outputs, h_n, c_n, h_seq, c_seq, gates, parts):
    """Runs the LSTM recurrence over all timesteps.

    Each step splits the hidden units into `parts` slices run in parallel,
    each doing its own recurrent product and gate math; the end of the
    parallel loop is the barrier between steps.

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
        parts: how many slices of hidden units run in parallel (1: serial).
    """
    T, N, H = outputs.shape
    packed = _pack_columns(recurrent_kernel, parts)
    width = packed.shape[3]
    h = np.empty((2, N, H), np.float32)
    h[0] = h0
    c = c0.copy()
    z = np.empty((parts, 4, N, width), np.float32)
    masked_h = np.empty((parts, N, H), np.float32)
    save = gates.shape[0] > 0
    if save:
        h_seq[0] = h0
        c_seq[0] = c0
    for t in range(T):
        src = h[t % 2]
        dst = h[(t + 1) % 2]
        if parts == 1:
            _forward_part(0, t, xw, packed, src, dst, c, mask, recurrent_mask, activation,
                          recurrent_activation, zero_output_for_mask, outputs, gates,
                          z[0], masked_h[0])
        else:
            for p in prange(parts):
                _forward_part(p, t, xw, packed, src, dst, c, mask, recurrent_mask, activation,
                              recurrent_activation, zero_output_for_mask, outputs, gates,
                              z[p], masked_h[p])
        if save:
            h_seq[t + 1] = dst
            c_seq[t + 1] = c
    h_n[:] = h[T % 2]
    c_n[:] = c


@njit(error_model="numpy", cache=True)
def _backward_gates_part(p, t, width, mask, activation, recurrent_activation,
                         zero_output_for_mask, c_seq, gates, d_outputs, dh, dc, carried, d_xw):
    """Pointwise gradients of step t for part p's hidden units, all four gates.

    Consumes `dh` and `dc` of part p's units; writes their columns of `d_xw[t]`.
    """
    N, H = dh.shape
    j0 = p * width
    j1 = min(j0 + width, H)
    for n in range(N):
        if mask.shape[0] > 0 and not mask[t, n]:
            for j in range(j0, j1):
                for g in range(4):
                    d_xw[t, n, g * H + j] = 0
                if zero_output_for_mask:
                    carried[n, j] = 0
                else:
                    carried[n, j] += d_outputs[t, n, j]
            continue
        _cell_rows_backward(
            gates[t, n, j0:j1], gates[t, n, H + j0:H + j1],
            gates[t, n, 2 * H + j0:2 * H + j1], gates[t, n, 3 * H + j0:3 * H + j1],
            c_seq[t, n, j0:j1], c_seq[t + 1, n, j0:j1], d_outputs[t, n, j0:j1],
            carried[n, j0:j1], dh[n, j0:j1], dc[n, j0:j1],
            d_xw[t, n, j0:j1], d_xw[t, n, H + j0:H + j1],
            d_xw[t, n, 2 * H + j0:2 * H + j1], d_xw[t, n, 3 * H + j0:3 * H + j1],
            activation, recurrent_activation)


@njit(error_model="numpy", cache=True)
def _cell_rows_backward(i, f, g, o, c_prev, c, d_out, carried, dh, dc, dzi, dzf, dzc, dzo,
                        activation, recurrent_activation):
    """Gradients of the cell update on [W] rows; `dc` becomes the previous carry's
    gradient and `carried` is consumed. Contiguous rows, so LLVM vectorizes."""
    for k in range(c.shape[0]):
        dzi[k], dzf[k], dzc[k], dzo[k], dc[k] = _cell_backward(
            i[k], f[k], g[k], o[k], c_prev[k], c[k], d_out[k] + carried[k] + dh[k], dc[k],
            activation, recurrent_activation)
        carried[k] = 0


@njit(error_model="numpy", cache=True)
def _backward_recurrent_part(p, t, packed_t, mask, recurrent_mask, d_xw, dh, dh_part, dz_gate,
                             dh_gate):
    """dh of part p's units from all of `d_xw[t]`: through `recurrent_kernel`, masked rows kept.

    `dz_gate` [N, H] and `dh_gate` [N, width] are scratch for recurrent dropout.
    """
    N, H = dh.shape
    width = packed_t.shape[2]
    j0 = p * width
    j1 = min(j0 + width, H)
    if recurrent_mask.shape[0] == 0:
        np.dot(d_xw[t], packed_t[p], dh_part)
    else:
        dh_part[:] = 0
        for g in range(4):
            dz_gate[:] = d_xw[t, :, g * H:(g + 1) * H]
            np.dot(dz_gate, packed_t[p, g * H:(g + 1) * H], dh_gate)
            for n in range(N):
                for j in range(j0, j1):
                    dh_part[n, j - j0] += dh_gate[n, j - j0] * recurrent_mask[g, n, j]
    for n in range(N):
        if mask.shape[0] == 0 or mask[t, n]:
            for j in range(j0, j1):
                dh[n, j] = dh_part[n, j - j0]


@njit(nogil=True, parallel=True, error_model="numpy", cache=True)
def lstm_backward(recurrent_kernel, mask, recurrent_mask, activation,
                  recurrent_activation, zero_output_for_mask,
                  c_seq, gates, d_outputs, d_h_n, d_c_n,
                  d_xw, d_h0, d_c0, parts):
    """Backpropagates through the recurrence (BPTT), in reverse time.

    Each part of the hidden units first computes the recurrent gradient of
    step t + 1 for its units, then the pointwise gradients of step t, which
    need only its own units: one parallel loop, one barrier, per step.

    Args:
        recurrent_kernel, mask, recurrent_mask, activation,
        recurrent_activation, zero_output_for_mask, parts: as for `lstm_forward`.
        c_seq: [T+1, N, H] and gates: [T, N, 4H], saved by `lstm_forward`.
        d_outputs: [T, N, H] gradient of the outputs.
        d_h_n, d_c_n: [N, H] gradients of the final states.
        d_xw: [T, N, 4H] gradient of the input projection, written.
        d_h0, d_c0: [N, H] gradients of the initial states, written.
    """
    T, N, H = d_outputs.shape
    packed_t = _pack_rows_transposed(recurrent_kernel, parts)
    width = packed_t.shape[2]
    dh = d_h_n.copy()
    dc = d_c_n.copy()
    carried = np.zeros((N, H), np.float32)
    dh_part = np.empty((parts, N, width), np.float32)
    dz_gate = np.empty((parts, N, H), np.float32)
    dh_gate = np.empty((parts, N, width), np.float32)
    for t in range(T, -1, -1):
        if parts == 1:
            _backward_step_part(0, t, T, width, packed_t, mask, recurrent_mask, activation,
                                recurrent_activation, zero_output_for_mask, c_seq, gates,
                                d_outputs, dh, dc, carried, d_xw, dh_part[0], dz_gate[0],
                                dh_gate[0])
        else:
            for p in prange(parts):
                _backward_step_part(p, t, T, width, packed_t, mask, recurrent_mask, activation,
                                    recurrent_activation, zero_output_for_mask, c_seq, gates,
                                    d_outputs, dh, dc, carried, d_xw, dh_part[p], dz_gate[p],
                                    dh_gate[p])
    d_h0[:] = dh
    d_c0[:] = dc


@njit(error_model="numpy", cache=True)
def _backward_step_part(p, t, T, width, packed_t, mask, recurrent_mask, activation,
                        recurrent_activation, zero_output_for_mask, c_seq, gates,
                        d_outputs, dh, dc, carried, d_xw, dh_part, dz_gate, dh_gate):
    if t < T:
        _backward_recurrent_part(p, t, packed_t, mask, recurrent_mask, d_xw, dh, dh_part,
                                 dz_gate, dh_gate)
    if t > 0:
        _backward_gates_part(p, t - 1, width, mask, activation, recurrent_activation,
                             zero_output_for_mask, c_seq, gates, d_outputs, dh, dc, carried, d_xw)


_MIN_ROWS_PER_CHUNK = 32
_COLUMNS_PER_BLOCK = 128


@njit(nogil=True, parallel=True, error_model="numpy", cache=True)
def accumulate_outer(a, b, out, rows_per_chunk):
    """out[K1, K2] = a.T @ b for a [R, K1] and b [R, K2], summed in float64.

    Weight gradients sum over all T * N rows. One float32 GEMM per chunk of
    rows (one timestep's N rows, at least 32), accumulated in float64 across
    chunks, keeps their error at the level of the per-step sums the stock
    layer makes; one long float32 GEMM does not. Columns go in blocks so that
    the float64 accumulator stays in cache.
    """
    K1 = a.shape[1]
    blocks = -(-b.shape[1] // _COLUMNS_PER_BLOCK)
    for block in prange(blocks):
        c0 = block * _COLUMNS_PER_BLOCK
        c1 = min(c0 + _COLUMNS_PER_BLOCK, b.shape[1])
        b_block = np.ascontiguousarray(b[:, c0:c1])
        acc = np.zeros((K1, c1 - c0), np.float64)
        part = np.empty((K1, c1 - c0), np.float32)
        for r0 in range(0, a.shape[0], rows_per_chunk):
            r1 = min(r0 + rows_per_chunk, a.shape[0])
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
    outputs = _aligned_empty((T, N, H))
    h_n = _aligned_empty((N, H))
    c_n = _aligned_empty((N, H))
    h_seq = _aligned_empty((T + 1 if training else 0, N, H))
    c_seq = _aligned_empty(h_seq.shape)
    gates = _aligned_empty((T if training else 0, N, H4))
    lstm_forward(
        np.ascontiguousarray(xw, f32), np.ascontiguousarray(recurrent_kernel, f32),
        np.ascontiguousarray(h0, f32), np.ascontiguousarray(c0, f32),
        _mask_or_empty(mask, N), _recurrent_mask_or_empty(recurrent_mask, N, H),
        activation, recurrent_activation, bool(zero_output_for_mask),
        outputs, h_n, c_n, h_seq, c_seq, gates, _parts(N, H))
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
    d_xw = _aligned_empty((T, N, 4 * H))
    d_h0 = _aligned_empty((N, H))
    d_c0 = _aligned_empty((N, H))
    lstm_backward(
        np.ascontiguousarray(recurrent_kernel, f32), _mask_or_empty(mask, N),
        _recurrent_mask_or_empty(recurrent_mask, N, H),
        activation, recurrent_activation, bool(zero_output_for_mask),
        c_seq, gates, np.ascontiguousarray(d_outputs, f32),
        np.ascontiguousarray(d_h_n, f32), np.ascontiguousarray(d_c_n, f32),
        d_xw, d_h0, d_c0, _parts(N, H))
    return d_xw, d_h0, d_c0


def gradients(x, recurrent_kernel, mask, input_mask, recurrent_mask, activation,
              recurrent_activation, zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n):
    """The recurrence's gradients and the weight gradients, summed in float64.

    Args:
        x: [T, N, C] inputs (time-major, before input dropout).
        input_mask: [4, N, C] per-gate input dropout or None.
        Others: as for `backward`.

    Returns:
        `(d_xw, d_kernel, d_bias, d_recurrent_kernel, d_h0, d_c0)`; the
        framework computes the inputs' gradient from `d_xw`.
    """
    d_xw, d_h0, d_c0 = backward(
        recurrent_kernel, mask, recurrent_mask, activation, recurrent_activation,
        zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n)
    d_kernel = _gate_weight_grad(np.asarray(x, np.float32), d_xw, input_mask)
    d_recurrent_kernel = _gate_weight_grad(saved[0][:-1], d_xw, recurrent_mask)
    d_bias = d_xw.reshape(-1, d_xw.shape[-1]).sum(0, dtype=np.float64).astype(np.float32)
    return d_xw, d_kernel, d_bias, d_recurrent_kernel, d_h0, d_c0


def _gate_weight_grad(inputs, d_xw, masks):
    """[K, 4H] = sum over steps and rows of (inputs * mask_g).T @ d_xw_g per gate g."""
    K = inputs.shape[-1]
    H = d_xw.shape[-1] // 4
    rows = max(_MIN_ROWS_PER_CHUNK, inputs.shape[1])
    out = _aligned_empty((K, 4 * H))
    if masks is None:
        accumulate_outer(inputs.reshape(-1, K), d_xw.reshape(-1, 4 * H), out, rows)
        return out
    block = np.empty((K, H), np.float32)
    for g in range(4):
        masked = np.ascontiguousarray(inputs * masks[g]).reshape(-1, K)
        d_gate = np.ascontiguousarray(d_xw[..., g * H:(g + 1) * H]).reshape(-1, H)
        accumulate_outer(masked, d_gate, block, rows)
        out[:, g * H:(g + 1) * H] = block
    return out


_MIN_MACS_PER_PART = 1 << 18


def _parts(N, H):
    """Slices of hidden units run in parallel: one per thread when a step has the work."""
    return int(max(1, min(numba.get_num_threads(), N * 4 * H * H // _MIN_MACS_PER_PART, H)))


def _single_threaded_scipy_blas():
    """Numba's `np.dot` calls SciPy's BLAS from inside the kernels' own parallel
    loops; BLAS threads of its own would only fight them."""
    import scipy.linalg.cython_blas  # noqa: F401  (loads the library)

    for library in threadpoolctl.ThreadpoolController().lib_controllers:
        if library.user_api == "blas" and "scipy.libs" in library.filepath:
            library.set_num_threads(1)


_single_threaded_scipy_blas()


def _aligned_empty(shape, alignment=64):
    """An uninitialized float32 array whose data is 64-byte aligned: TensorFlow
    adopts such a callback result without copying it."""
    size = int(np.prod(shape)) * 4
    buffer = np.empty(size + alignment, np.uint8)
    start = -buffer.ctypes.data % alignment
    return buffer[start:start + size].view(np.float32).reshape(shape)


def _mask_or_empty(mask, N):
    if mask is None:
        return np.zeros((0, N), np.bool_)
    return np.ascontiguousarray(mask, np.bool_)


def _recurrent_mask_or_empty(recurrent_mask, N, H):
    if recurrent_mask is None:
        return np.zeros((0, N, H), np.float32)
    return np.ascontiguousarray(recurrent_mask, np.float32)
