"""A float64 NumPy reference of the Keras LSTM, forward and backward.

It follows `keras.layers.LSTM` step by step (batch-major inputs, masks,
per-gate recurrent dropout masks, `go_backwards`, `zero_output_for_mask`) and
backpropagates by hand, so that both the fused layer and the stock layer can be
measured against a higher-precision answer.
"""

import numpy as np

ACTIVATIONS = {
    "tanh": (np.tanh, lambda y: 1 - y * y),
    "sigmoid": (lambda x: 1 / (1 + np.exp(-x)), lambda y: y * (1 - y)),
    "hard_sigmoid": (lambda x: np.clip(x / 6 + 0.5, 0, 1),
                     lambda y: ((y > 0) & (y < 1)) / 6.0),
    "relu": (lambda x: np.maximum(x, 0), lambda y: (y > 0) * 1.0),
    "linear": (lambda x: x, lambda y: np.ones_like(y)),
    "softsign": (lambda x: x / (1 + np.abs(x)), lambda y: (1 - np.abs(y)) ** 2),
}


def lstm_forward(x, kernel, recurrent_kernel, bias, h0=None, c0=None, mask=None,
                 recurrent_masks=None, input_masks=None, activation="tanh",
                 recurrent_activation="sigmoid", go_backwards=False,
                 zero_output_for_mask=False):
    """Keras LSTM forward in float64.

    Args:
        x: [N, T, C]; kernel [C, 4H]; recurrent_kernel [H, 4H]; bias [4H] or None.
        h0, c0: [N, H] or None for zeros; mask: [N, T] bool or None.
        recurrent_masks: [4, N, H] or None; input_masks: [4, N, C] or None.

    Returns:
        `(outputs [N, T, H] in processing order, h, c, tape)`; `tape` holds what
        `lstm_backward` needs.
    """
    x = np.asarray(x, np.float64)
    N, T, C = x.shape
    H = recurrent_kernel.shape[0]
    W = np.asarray(kernel, np.float64)
    U = np.asarray(recurrent_kernel, np.float64)
    b = np.zeros(4 * H) if bias is None else np.asarray(bias, np.float64)
    h = np.zeros((N, H)) if h0 is None else np.asarray(h0, np.float64).copy()
    c = np.zeros((N, H)) if c0 is None else np.asarray(c0, np.float64).copy()
    m = np.ones((N, T), bool) if mask is None else np.asarray(mask, bool)
    rm = np.ones((4, N, H)) if recurrent_masks is None else np.asarray(recurrent_masks, np.float64)
    im = np.ones((4, N, C)) if input_masks is None else np.asarray(input_masks, np.float64)
    act, _ = ACTIVATIONS[activation]
    ract, _ = ACTIVATIONS[recurrent_activation]
    order = range(T - 1, -1, -1) if go_backwards else range(T)
    outputs = np.zeros((N, T, H))
    last = np.zeros((N, H))
    tape = []
    for k, t in enumerate(order):
        z = np.concatenate(
            [(x[:, t] * im[g]) @ W[:, g * H:(g + 1) * H]
             + (h * rm[g]) @ U[:, g * H:(g + 1) * H] for g in range(4)], axis=1) + b
        i, f = ract(z[:, :H]), ract(z[:, H:2 * H])
        g_, o = act(z[:, 2 * H:3 * H]), ract(z[:, 3 * H:])
        c_new = f * c + i * g_
        h_new = o * act(c_new)
        live = m[:, t][:, None]
        tape.append((t, h.copy(), c.copy(), i, f, g_, o, c_new, live))
        out = np.where(live, h_new, 0.0 if zero_output_for_mask else last)
        h = np.where(live, h_new, h)
        c = np.where(live, c_new, c)
        outputs[:, k] = out
        last = out
    return outputs, h, c, (tape, x, W, U, rm, im)


def lstm_backward(tape, d_outputs, d_h, d_c, activation="tanh",
                  recurrent_activation="sigmoid", zero_output_for_mask=False):
    """Gradients of `lstm_forward` by hand-written BPTT, in float64.

    Args:
        tape: the fourth value returned by `lstm_forward`.
        d_outputs: [N, T, H] in processing order; d_h, d_c: [N, H].

    Returns:
        A dict with `x`, `kernel`, `recurrent_kernel`, `bias`, `h0`, `c0`.
    """
    steps, x, W, U, rm, im = tape
    N, T, C = x.shape
    H = U.shape[0]
    act, dact = ACTIVATIONS[activation]
    _, dract = ACTIVATIONS[recurrent_activation]
    dx = np.zeros_like(x)
    dW, dU, db = np.zeros_like(W), np.zeros_like(U), np.zeros(4 * H)
    dh = np.asarray(d_h, np.float64).copy()
    dc = np.asarray(d_c, np.float64).copy()
    carried = np.zeros((N, H))
    for k in range(len(steps) - 1, -1, -1):
        t, h_prev, c_prev, i, f, g_, o, c_new, live = steps[k]
        d_out = d_outputs[:, k] + carried
        carried = np.where(live, 0.0, 0.0 if zero_output_for_mask else d_out)
        dh_new = np.where(live, d_out + dh, 0.0)
        dc_new = np.where(live, dc, 0.0)
        ac = act(c_new)
        dc_tot = dc_new + dh_new * o * dact(ac)
        dz = np.concatenate([dc_tot * g_ * dract(i), dc_tot * c_prev * dract(f),
                             dc_tot * i * dact(g_), dh_new * ac * dract(o)], axis=1)
        db += dz.sum(0)
        dh_prev = np.zeros((N, H))
        for g in range(4):
            cols = slice(g * H, (g + 1) * H)
            dW[:, cols] += (x[:, t] * im[g]).T @ dz[:, cols]
            dx[:, t] += (dz[:, cols] @ W[:, cols].T) * im[g]
            dU[:, cols] += (h_prev * rm[g]).T @ dz[:, cols]
            dh_prev += (dz[:, cols] @ U[:, cols].T) * rm[g]
        dh = np.where(live, dh_prev, dh)
        dc = np.where(live, dc_tot * f, dc)
    return {"x": dx, "kernel": dW, "recurrent_kernel": dU, "bias": db, "h0": dh, "c0": dc}
