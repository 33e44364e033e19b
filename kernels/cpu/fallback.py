"""The whole-layer CPU API in NumPy: what runs while the kernels compile.

`forward` and `backward` take and return what the kernels' host drivers do
(`kernels.cpu.drivers`: x, the three weights and the masks in, outputs and all
gradients out, batch-major float32), computed with NumPy: the input
projection and the weight gradients as one matmul over all steps, the
recurrence as a Python loop over the steps, each step vectorized over the
batch. The gate math is `kernels.gates`' (the same activations and
derivatives written on outputs); tanh is NumPy's rather than the kernels'
rational approximation (2.6e-7 apart), inside the parity tolerance.

Nothing here calls Numba: a compile in a background thread holds Numba's
compiler lock, and this module must run while it does. That compile keeps a
core busy, so NumPy's BLAS runs on one thread here: its threads sync on
every per-step product, and with a core taken each sync waits for the
scheduler (the S2 forward pass, [32, 100, 64] -> 256 units, took 0.3-1.0 s on
two threads of a loaded 2-core machine, 0.09 s on one). `input_projection`
and `weight_gradients` also serve the drivers around a kernel that takes the
projection.
"""

import functools

import numpy as np
import threadpoolctl

from ..checks import check_layer_backward, check_layer_forward
from ..gates import HARD_SIGMOID, LINEAR, RELU, SIGMOID, SOFTSIGN, TANH

_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_SIXTH = np.float32(1.0 / 6.0)


def _activate(code, x):
    """`gates.activate` on a float32 array."""
    if code == TANH:
        return np.tanh(x)
    if code == SIGMOID:
        return _HALF + _HALF * np.tanh(_HALF * x)
    if code == HARD_SIGMOID:
        return np.clip(x * _SIXTH + _HALF, 0, 1)
    if code == RELU:
        return np.where(x < 0, np.float32(0), x)
    if code == SOFTSIGN:
        return x / (_ONE + np.abs(x))
    if code == LINEAR:
        return x
    raise ValueError(f"Expected an activation code from kernels.gates.ACTIVATION_CODES. "
                     f"Received: {code!r}")


def _activation_grad(code, y):
    """`gates.activation_grad`: the derivative at the points whose outputs are `y`."""
    if code == TANH:
        return _ONE - y * y
    if code == SIGMOID:
        return y * (_ONE - y)
    if code == HARD_SIGMOID:
        return np.where((y > 0) & (y < 1), _SIXTH, np.float32(0))
    if code == RELU:
        return (y > 0).astype(np.float32)
    if code == SOFTSIGN:
        s = _ONE - np.abs(y)
        return s * s
    return np.ones_like(y)


def one_blas_thread(function):
    """`function`, run with NumPy's BLAS on one thread (see the module docstring)."""
    @functools.wraps(function)
    def limited(*args, **kwargs):
        with _blas_controller().limit(limits=1, user_api="blas"):
            return function(*args, **kwargs)
    return limited


@functools.lru_cache(maxsize=None)
def _blas_controller():
    return threadpoolctl.ThreadpoolController()


@one_blas_thread
def forward(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask, recurrent_mask,
            activation, recurrent_activation, zero_output_for_mask, training, out=None):
    """The layer's forward pass; arguments and results as `kernels.cpu.drivers.forward`.

    Args:
        x: [N, T, C]; kernel: [C, 4H]; bias: [4H]; recurrent_kernel: [H, 4H];
            h0, c0: [N, H]; float32, C-contiguous.
        mask: [N, T] bool or None; input_mask: [4, N, C] or None;
            recurrent_mask: [4, N, H] or None.
        activation, recurrent_activation: codes from `gates.ACTIVATION_CODES`.
        zero_output_for_mask: masked steps output zeros, not the last output.
        training: save what `backward` needs.
        out: arrays to write the results into, in the order returned, or None.

    Returns:
        `(outputs [N, T, H], h_n [N, H], c_n [N, H], saved)`, `saved = (h_in
        [N, T, H], c_seq [N, T+1, H], gates [N, T, 4H])` when training, else None.

    Raises:
        ValueError: an input's shape, dtype or layout does not match `x`'s.
    """
    N, T, _, H = check_layer_forward(x, kernel, bias, recurrent_kernel, h0, c0, mask,
                                     input_mask, recurrent_mask)
    steps = T if training else 0
    outputs, h_n, c_n, h_in, c_seq, gates = results_into(
        [(N, T, H), (N, H), (N, H), (N, steps, H), (N, T + 1 if training else 0, H),
         (N, steps, 4 * H)], out)
    xw = input_projection(x, kernel, bias, input_mask)
    h, c = h0.copy(), c0.copy()
    z = np.empty((N, 4 * H), np.float32)
    for t in range(T):
        if training:
            h_in[:, t] = h
            c_seq[:, t] = c
        _recurrent_product(h, recurrent_kernel, recurrent_mask, z)
        z += xw[:, t]
        i, f, o = (_activate(recurrent_activation, z[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
        g = _activate(activation, z[:, 2 * H:3 * H])
        c_new = f * c + i * g
        h_new = o * _activate(activation, c_new)
        step_gates = (i, f, g, o)
        if mask is None:
            outputs[:, t] = h_new
            h, c = h_new, c_new
        else:
            live = mask[:, t, None]
            last = 0 if zero_output_for_mask or t == 0 else outputs[:, t - 1]
            outputs[:, t] = np.where(live, h_new, last)
            h, c = np.where(live, h_new, h), np.where(live, c_new, c)
            step_gates = [np.where(live, a, np.float32(0)) for a in step_gates]
        if training:
            for k, a in enumerate(step_gates):
                gates[:, t, k * H:(k + 1) * H] = a
    h_n[...] = h
    c_n[...] = c
    if training:
        c_seq[:, T] = c
    return outputs, h_n, c_n, ((h_in, c_seq, gates) if training else None)


@one_blas_thread
def backward(x, kernel, recurrent_kernel, mask, input_mask, recurrent_mask, activation,
             recurrent_activation, zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n,
             out=None):
    """The layer's backward pass; arguments and results as `kernels.cpu.drivers.backward`.

    Args:
        saved: `(h_in, c_seq, gates)` from `forward(..., training=True)`.
        d_outputs: [N, T, H]; d_h_n, d_c_n: [N, H]: gradients of the results.
        out: arrays to write the results into, in the order returned, or None.

    Returns:
        `(d_x [N, T, C], d_kernel [C, 4H], d_recurrent_kernel [H, 4H],
        d_bias [4H], d_h0 [N, H], d_c0 [N, H])`.

    Raises:
        ValueError: an input's shape, dtype or layout does not match `x`'s.
    """
    N, T, C, H = check_layer_backward(x, kernel, recurrent_kernel, mask, input_mask,
                                      recurrent_mask, saved, d_outputs, d_h_n, d_c_n)
    out = list(out or ())
    d_xw = np.empty((N, T, 4 * H), np.float32)
    d_h0, d_c0 = results_into([(N, H), (N, H)], out[4:6])
    h_in, c_seq, gates = saved
    dh, dc = d_h_n.copy(), d_c_n.copy()
    carried = np.zeros((N, H), np.float32)
    recurrent_kernel_t = np.ascontiguousarray(recurrent_kernel.T)
    dh_prev = np.empty((N, H), np.float32)
    for t in range(T - 1, -1, -1):
        i, f, g, o = (gates[:, t, k * H:(k + 1) * H] for k in range(4))
        c_prev, c = c_seq[:, t], c_seq[:, t + 1]
        dh_total = d_outputs[:, t] + carried + dh
        ac = _activate(activation, c)
        dc_total = dc + dh_total * o * _activation_grad(activation, ac)
        d_z = (dc_total * g * _activation_grad(recurrent_activation, i),
               dc_total * c_prev * _activation_grad(recurrent_activation, f),
               dc_total * i * _activation_grad(activation, g),
               dh_total * ac * _activation_grad(recurrent_activation, o))
        dc_prev = dc_total * f
        if mask is not None:
            live = mask[:, t, None]
            d_z = [np.where(live, d, np.float32(0)) for d in d_z]
            carried = (np.zeros_like(carried) if zero_output_for_mask
                       else np.where(live, np.float32(0), carried + d_outputs[:, t]))
        for k, d in enumerate(d_z):
            d_xw[:, t, k * H:(k + 1) * H] = d
        _recurrent_grad(d_xw[:, t], recurrent_kernel_t, recurrent_mask, dh_prev)
        if mask is None:
            dh, dc = dh_prev.copy(), dc_prev
        else:
            dh, dc = np.where(live, dh_prev, dh), np.where(live, dc_prev, dc)
    d_h0[...] = dh
    d_c0[...] = dc
    d_x, d_kernel, d_recurrent_kernel, d_bias = weight_gradients(
        x, kernel, input_mask, recurrent_mask, h_in, d_xw, out[:4])
    return d_x, d_kernel, d_recurrent_kernel, d_bias, d_h0, d_c0


def _recurrent_product(h, recurrent_kernel, recurrent_mask, z):
    """z [N, 4H] = h @ recurrent_kernel, gate g on `h * recurrent_mask[g]` if given."""
    if recurrent_mask is None:
        np.matmul(h, recurrent_kernel, out=z)
        return
    H = h.shape[1]
    for g in range(4):
        np.matmul(h * recurrent_mask[g], recurrent_kernel[:, g * H:(g + 1) * H],
                  out=z[:, g * H:(g + 1) * H])


def _recurrent_grad(d_z, recurrent_kernel_t, recurrent_mask, dh):
    """dh [N, H] = the gradient of `_recurrent_product`'s h from d_z [N, 4H]."""
    if recurrent_mask is None:
        np.matmul(d_z, recurrent_kernel_t, out=dh)
        return
    H = dh.shape[1]
    dh[...] = 0
    for g in range(4):
        rows = slice(g * H, (g + 1) * H)
        dh += (d_z[:, rows] @ recurrent_kernel_t[rows]) * recurrent_mask[g]


def input_projection(x, kernel, bias, input_mask):
    """xw [N, T, 4H] = x @ kernel + bias, gate g on `x * input_mask[g]` if given.

    Args:
        x: [N, T, C]; kernel: [C, 4H]; bias: [4H]; input_mask: [4, N, C] or None.
    """
    N, T, C = x.shape
    H = kernel.shape[1] // 4
    xw = np.empty((N, T, 4 * H), np.float32)
    for g, inputs in _gate_inputs(x, input_mask):
        columns = slice(None) if g is None else slice(g * H, (g + 1) * H)
        np.matmul(inputs.reshape(N * T, C), kernel[:, columns],
                  out=xw.reshape(N * T, 4 * H)[:, columns])
    xw += bias
    return xw


def weight_gradients(x, kernel, input_mask, recurrent_mask, h_in, d_xw, out=()):
    """The gradients through the projections, given d_xw [N, T, 4H].

    Args:
        x: [N, T, C]; kernel: [C, 4H]; input_mask: [4, N, C] or None;
            recurrent_mask: [4, N, H] or None; h_in: [N, T, H] the state each
            step read.
        out: up to four arrays to write the results into, or empty.

    Returns:
        `(d_x [N, T, C], d_kernel [C, 4H], d_recurrent_kernel [H, 4H], d_bias [4H])`.
    """
    N, T, C = x.shape
    H = d_xw.shape[2] // 4
    d_x, d_kernel, d_recurrent_kernel, d_bias = results_into(
        [(N, T, C), (C, 4 * H), (H, 4 * H), (4 * H,)], out)
    flat_d_xw = d_xw.reshape(N * T, 4 * H)
    _gate_weight_grad(x, input_mask, flat_d_xw, d_kernel)
    _gate_weight_grad(h_in, recurrent_mask, flat_d_xw, d_recurrent_kernel)
    np.sum(flat_d_xw, axis=0, out=d_bias)
    flat_d_x = d_x.reshape(N * T, C)
    if input_mask is None:
        np.matmul(flat_d_xw, kernel.T, out=flat_d_x)
    else:
        d_x[...] = 0
        for g in range(4):
            columns = slice(g * H, (g + 1) * H)
            d_x += (flat_d_xw[:, columns] @ kernel[:, columns].T).reshape(N, T, C) * \
                input_mask[g][:, None, :]
    return d_x, d_kernel, d_recurrent_kernel, d_bias


def _gate_weight_grad(inputs, masks, flat_d_xw, result):
    """result [K, 4H]: per gate g, the sum over rows and steps of (inputs * masks[g]).T @ d_xw_g."""
    N, T, K = inputs.shape
    H = flat_d_xw.shape[1] // 4
    for g, gate_inputs in _gate_inputs(inputs, masks):
        columns = slice(None) if g is None else slice(g * H, (g + 1) * H)
        np.matmul(gate_inputs.reshape(N * T, K).T, flat_d_xw[:, columns], out=result[:, columns])


def _gate_inputs(inputs, masks):
    """`(gate, inputs * masks[gate])` for each gate, or `(None, inputs)` once without masks."""
    if masks is None:
        return [(None, inputs)]
    return [(g, inputs * masks[g][:, None, :]) for g in range(4)]


def results_into(shapes, out):
    """The arrays to write results into: those of `out`, checked, then new ones.

    Raises:
        ValueError: an array of `out` is not a writable C-contiguous float32
            array of its result's shape.
    """
    out = list(out or ())[:len(shapes)]
    for array, shape in zip(out, shapes):
        if (array.shape != tuple(shape) or array.dtype != np.float32
                or not array.flags.c_contiguous or not array.flags.writeable):
            raise ValueError(
                f"Expected a writable C-contiguous float32 array of shape {tuple(shape)} to "
                f"write a result into. Received: shape={array.shape}, dtype={array.dtype}, "
                f"flags={'C' if array.flags.c_contiguous else 'not C'}-contiguous, "
                f"{'writable' if array.flags.writeable else 'read-only'}")
    return out + [np.empty(shape, np.float32) for shape in shapes[len(out):]]
