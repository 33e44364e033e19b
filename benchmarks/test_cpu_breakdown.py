"""Where the fused layer's CPU time goes, per shape: the layer itself and each part
of it timed alone, in one process (`--framework fusedlstm`, TensorFlow).

Parts: the input projection (a TF matmul), the forward recurrence
(`fusedlstm.kernels.cpu.forward`, without and with saving for training), the
cell math alone (the kernels' own row functions over every row and step, one
thread), the backward recurrence (`backward`) and the weight gradients (the TF
matmuls of `fusedlstm.backends.projection.gate_weight_grad`). `kernel_report.py`
subtracts: framework glue = the layer - its parts. (The
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

    from fusedlstm.backends import projection

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


def test_weight_gradients(benchmark, problem):
    import tensorflow as tf

    from fusedlstm.backends import projection

    shape, p = problem
    d_xw = p.backward()[0]
    x, h_in, d_xw = (tf.constant(a) for a in (p.x, p.saved[0], d_xw))

    @tf.function
    def weight_grads():
        return (projection.gate_weight_grad(x, d_xw, None),
                projection.gate_weight_grad(h_in, d_xw, None), tf.reduce_sum(d_xw, [0, 1]))

    part(benchmark, shape, "train", "weight_grads", lambda: [g.numpy() for g in weight_grads()])


def test_cell_math(benchmark, problem):
    shape, p = problem
    N, T, H = p.outputs.shape
    width = -(-H // 32) * 32
    z = np.zeros((N, 4 * width), np.float32)
    out, h, gates = np.empty_like(p.outputs), np.empty((N, H), np.float32), np.empty((N, 0, 4 * H), np.float32)
    forward, _ = cell_math_loops(*p.codes)
    part(benchmark, shape, "fwd", "cell_math",
         lambda: forward(p.xw, z, p.zeros.copy(), h, out, gates))


def test_cell_math_backward(benchmark, problem):
    shape, p = problem
    _, c_seq, gates = p.saved
    d_xw = np.empty_like(gates)
    carried, dh = np.zeros_like(p.zeros), np.zeros_like(p.zeros)
    _, backward = cell_math_loops(*p.codes)
    part(benchmark, shape, "train", "cell_math_backward",
         lambda: backward(gates, c_seq, p.d_outputs, carried, dh, p.zeros.copy(), d_xw))


@functools.cache
def cell_math_loops(activation, recurrent_activation):
    """`(forward, backward)`: the kernels' own cell-math row functions over every row and
    step, specialized on the activation pair as the kernels are, without the GEMMs.

    Built on first use, so that collecting this file imports no framework.
    """
    from fusedlstm.kernels import cpu

    cell_forward, cell_backward = cpu._cell_row_forward, cpu._cell_row_backward

    @numba.njit(error_model="numpy")
    def forward(xw, z, c, h, outputs, gates):
        """Forward cell math of all [N, T] rows and steps, pre-activations `xw` (+ z = 0)."""
        N, T, _ = xw.shape
        width = z.shape[1] // 4
        for t in range(T):
            for n in range(N):
                cell_forward(xw, n, t, z, n, width, c, h, outputs, gates, activation,
                             recurrent_activation)

    @numba.njit(error_model="numpy")
    def backward(gates, c_seq, d_outputs, carried, dh, dc, d_xw):
        """Backward cell math of all [N, T] rows and steps, in reverse time."""
        N, T, _ = d_outputs.shape
        for t in range(T - 1, -1, -1):
            for n in range(N):
                cell_backward(n, t, n, gates, c_seq, d_outputs, carried, dh, dc, d_xw,
                              activation, recurrent_activation)

    return forward, backward
