"""The CPU kernels on their own: gate math accuracy and the recurrence against
the float64 reference, without a framework in between."""

import numpy as np
import pytest
from numba import njit

import reference
from fusedlstm.kernels import cpu
from fusedlstm.kernels import gates

_compiled = gates.compile_gates(njit)
_activate = _compiled.activate


@njit
def activate_all(code, xs):
    out = np.empty_like(xs)
    for k in range(xs.size):
        out[k] = _activate(code, xs[k])
    return out


@pytest.mark.parametrize("name", sorted(gates.ACTIVATION_CODES))
def test_activations_match_float64(name):
    xs = np.linspace(-12, 12, 200001).astype("float32")
    got = activate_all(gates.ACTIVATION_CODES[name], xs).astype("float64")
    want = reference.ACTIVATIONS[name][0](xs.astype("float64"))
    assert np.abs(got - want).max() < 4e-7


def test_activations_pass_nan_through():
    xs = np.array([np.nan], "float32")
    for code in gates.ACTIVATION_CODES.values():
        assert np.isnan(activate_all(code, xs)[0])


def random_problem(rng, N, T, C, H):
    x = rng.normal(size=(N, T, C)).astype("float32")
    W = rng.normal(0, 0.5, (C, 4 * H)).astype("float32")
    U = rng.normal(0, 0.5, (H, 4 * H)).astype("float32")
    b = rng.normal(0, 0.5, 4 * H).astype("float32")
    h0, c0 = (rng.normal(size=(N, H)).astype("float32") for _ in range(2))
    return x, W, U, b, h0, c0


@pytest.mark.parametrize("zero_output", [False, True])
@pytest.mark.parametrize("masked,dropped", [(False, False), (True, False), (True, True)])
def test_forward_and_gradients_match_reference(masked, dropped, zero_output):
    rng = np.random.default_rng(1)
    N, T, C, H = 5, 9, 4, 6
    x, W, U, b, h0, c0 = random_problem(rng, N, T, C, H)
    mask = rng.random((N, T)) > 0.3 if masked else None
    rmask = (rng.random((4, N, H)) > 0.3).astype("float32") / 0.7 if dropped else None
    imask = (rng.random((4, N, C)) > 0.2).astype("float32") / 0.8 if dropped else None
    seq, h, c, tape = reference.lstm_forward(x, W, U, b, h0, c0, mask, rmask, imask,
                                             zero_output_for_mask=zero_output)
    x_t = np.ascontiguousarray(x.transpose(1, 0, 2))
    xw = np.concatenate([(x_t * (1 if imask is None else imask[g])) @ W[:, g * H:(g + 1) * H]
                         for g in range(4)], axis=-1) + b
    mask_t = None if mask is None else mask.T
    out, h_n, c_n, saved = cpu.forward(xw.astype("float32"), U, h0, c0, mask_t, rmask,
                                       gates.TANH, gates.SIGMOID, zero_output, True)
    np.testing.assert_allclose(out.transpose(1, 0, 2), seq, atol=1e-6)
    np.testing.assert_allclose(h_n, h, atol=1e-6)
    np.testing.assert_allclose(c_n, c, atol=1e-6)
    d_seq = rng.normal(size=seq.shape)
    d_h, d_c = rng.normal(size=h.shape), rng.normal(size=c.shape)
    want = reference.lstm_backward(tape, d_seq, d_h, d_c, zero_output_for_mask=zero_output)
    got = cpu.gradients(x_t, U, mask_t, imask, rmask, gates.TANH, gates.SIGMOID,
                        zero_output, saved, d_seq.transpose(1, 0, 2).astype("float32"),
                        d_h.astype("float32"), d_c.astype("float32"))
    names = ["xw", "kernel", "bias", "recurrent_kernel", "h0", "c0"]
    for name, g in zip(names[1:], got[1:]):
        np.testing.assert_allclose(g, want[name], atol=2e-5, err_msg=name)
    d_x = sum((got[0][..., g * H:(g + 1) * H] @ W[:, g * H:(g + 1) * H].T)
              * (1 if imask is None else imask[g]) for g in range(4))
    np.testing.assert_allclose(d_x.transpose(1, 0, 2), want["x"], atol=2e-5)


@pytest.mark.parametrize("dropped", [False, True])
def test_parallel_parts_match_serial(dropped):
    rng = np.random.default_rng(4)
    N, T, H = 6, 5, 37
    xw = rng.normal(size=(T, N, 4 * H)).astype("float32")
    U = rng.normal(0, 0.3, (H, 4 * H)).astype("float32")
    h0, c0 = (rng.normal(size=(N, H)).astype("float32") for _ in range(2))
    mask = rng.random((T, N)) > 0.3
    rmask = (rng.random((4, N, H)) > 0.3).astype("float32") if dropped else np.zeros((0, N, H), "float32")
    d_out = rng.normal(size=(T, N, H)).astype("float32")
    results = []
    for parts in (1, 2, 3):
        out, h_n, c_n = (np.empty(s, "float32") for s in ((T, N, H), (N, H), (N, H)))
        h_seq, c_seq = np.empty((T + 1, N, H), "float32"), np.empty((T + 1, N, H), "float32")
        gate_acts = np.empty((T, N, 4 * H), "float32")
        cpu.lstm_forward(xw, U, h0, c0, mask, rmask, 0, 1, False, out, h_n, c_n,
                         h_seq, c_seq, gate_acts, parts)
        d_xw, d_h0, d_c0 = np.empty_like(xw), np.empty_like(h0), np.empty_like(c0)
        cpu.lstm_backward(U, mask, rmask, 0, 1, False, c_seq, gate_acts, d_out, h0, c0,
                          d_xw, d_h0, d_c0, parts)
        results.append((out, h_n, c_n, d_xw, d_h0, d_c0))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(b, a, atol=1e-6)


def test_inference_saves_nothing():
    rng = np.random.default_rng(2)
    x, W, U, b, h0, c0 = random_problem(rng, 3, 4, 2, 5)
    xw = (x.transpose(1, 0, 2) @ W + b).astype("float32")
    out, h_n, _, saved = cpu.forward(xw, U, h0, c0, None, None, 0, 1, False, False)
    assert saved is None
    np.testing.assert_array_equal(out[-1], h_n)


def test_accumulate_outer_sums_long_columns_accurately():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5000, 7)).astype("float32")
    b = rng.normal(size=(5000, 9)).astype("float32")
    out = np.empty((7, 9), "float32")
    cpu.accumulate_outer(a, b, out, 32)
    exact = a.astype("float64").T @ b.astype("float64")
    one_gemm = np.abs(a.T @ b - exact).max()
    assert np.abs(out - exact).max() < min(one_gemm, 4e-7 * np.abs(exact).max())
