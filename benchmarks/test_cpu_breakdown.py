"""Where the fused layer's CPU time goes, per shape: the layer itself and each part
of it timed alone, in one process (`--framework fusedlstm`, TensorFlow).

Parts: the input projection (a TF matmul), the forward recurrence
(`fusedlstm.kernels.cpu.forward`, without and with saving for training), the
cell math alone (a loop over [T, N, H] arrays applying the gate functions, one
thread), the backward recurrence (`backward`) and the backward with the weight
gradients (`gradients`). `kernel_report.py` subtracts: weight
gradients = gradients - backward; framework glue = the layer - its parts. (The
inputs' gradient is not part of the training step timed: its inputs are
constants, and TensorFlow prunes what no fetched result needs.)
"""

import functools

import numba
import numpy as np
import pytest

import cases

ROUNDS = 7


def part(benchmark, shape, mode, name, run):
    benchmark.group = f"{shape}/breakdown"
    benchmark.name = f"{mode}/{name}"
    benchmark.extra_info.update(shape=shape, mode=mode, part=name, NTCH=cases.SHAPES[shape],
                                numba_threads=numba.get_num_threads())
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2, iterations=1)


@pytest.fixture(scope="module", params=sorted(cases.SHAPES))
def problem(request, framework):
    if framework != "fusedlstm":
        pytest.skip("the breakdown is of the fused layer (--framework fusedlstm)")
    return request.param, cases.KernelProblem(request.param)


@pytest.mark.parametrize("mode", cases.MODES)
def test_layer(benchmark, problem, mode):
    import fusedlstm

    shape, _ = problem
    part(benchmark, shape, mode, "layer",
         cases.make_keras(fusedlstm.LSTM, cases.SHAPES[shape], mode, "plain"))


def test_projection(benchmark, problem):
    import tensorflow as tf

    from fusedlstm import projection

    shape, p = problem
    x, kernel, bias = (tf.constant(a) for a in (p.x, p.kernel, p.bias))
    project = tf.function(lambda: projection.input_projection(x, kernel, bias, None))
    part(benchmark, shape, "fwd", "projection", lambda: project().numpy())


@pytest.mark.parametrize("mode", cases.MODES)
def test_recurrence(benchmark, problem, mode):
    shape, p = problem
    part(benchmark, shape, mode, "recurrence", lambda: p.forward(training=mode == "train"))


def test_backward_recurrence(benchmark, problem):
    shape, p = problem
    part(benchmark, shape, "train", "backward", p.backward)


def test_gradients(benchmark, problem):
    shape, p = problem
    part(benchmark, shape, "train", "gradients", p.gradients)


def test_cell_math(benchmark, problem):
    shape, p = problem
    zi, zf, zc, zo = (np.ascontiguousarray(a) for a in np.split(p.xw, 4, axis=-1))
    h = np.empty_like(zi)
    forward, _ = cell_math_loops()
    part(benchmark, shape, "fwd", "cell_math",
         lambda: forward(zi, zf, zc, zo, p.zeros.copy(), h, *p.codes))


def test_cell_math_backward(benchmark, problem):
    shape, p = problem
    H = p.recurrent_kernel.shape[0]
    _, c_seq, gates = p.saved
    i, f, g, o = (np.ascontiguousarray(gates[..., k * H:(k + 1) * H]) for k in range(4))
    d_z = np.empty_like(gates)
    _, backward = cell_math_loops()
    part(benchmark, shape, "train", "cell_math_backward",
         lambda: backward(i, f, g, o, c_seq, p.d_outputs, p.zeros.copy(), d_z, *p.codes))


@functools.cache
def cell_math_loops():
    """`(forward, backward)`: njit loops applying the gate functions over every step.

    Built on first use, so that collecting this file imports no framework.
    """
    from fusedlstm.kernels.gates import compile_gates

    gates = compile_gates(numba.njit(inline="always", error_model="numpy"))
    cell_forward, cell_backward = gates.cell_forward, gates.cell_backward

    @numba.njit(error_model="numpy")
    def forward(zi, zf, zc, zo, c, h, activation, recurrent_activation):
        """Forward gate math on [T, N, H] pre-activations; `c` [N, H] carries over
        steps, `h` [T, N, H] is written."""
        T, N, H = zi.shape
        for t in range(T):
            for n in range(N):
                for k in range(H):
                    _, _, _, _, c[n, k], h[t, n, k] = cell_forward(
                        zi[t, n, k], zf[t, n, k], zc[t, n, k], zo[t, n, k], c[n, k],
                        activation, recurrent_activation)

    @numba.njit(error_model="numpy")
    def backward(i, f, g, o, c_seq, d_h, dc, d_z, activation, recurrent_activation):
        """Backward gate math in reverse time on [T, N, H] saved gates and [T+1, N, H]
        carries; `dc` [N, H] carries over steps, `d_z` [T, N, 4H] is written."""
        T, N, H = i.shape
        for t in range(T - 1, -1, -1):
            for n in range(N):
                for k in range(H):
                    (d_z[t, n, k], d_z[t, n, H + k], d_z[t, n, 2 * H + k],
                     d_z[t, n, 3 * H + k], dc[n, k]) = cell_backward(
                        i[t, n, k], f[t, n, k], g[t, n, k], o[t, n, k], c_seq[t, n, k],
                        c_seq[t + 1, n, k], d_h[t, n, k], dc[n, k], activation,
                        recurrent_activation)

    return forward, backward
