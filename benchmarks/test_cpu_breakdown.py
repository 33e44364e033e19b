"""Where the fused layer's CPU time goes, per shape: the layer itself and each part
of it timed alone, in one process (`--framework fusedlstm`, TensorFlow).

Parts: the forward kernel (`fusedlstm.kernels.cpu.forward`, the input
projection included, without and with saving for training), the backward kernel
(`backward`: the input and weight gradients included), and the cell math alone
(the kernels' own row functions over every row and step, one thread).
`kernel_report.py` subtracts: framework glue = the layer - its kernels.
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


@pytest.mark.parametrize("mode", cases.MODES)
def test_forward_kernel(benchmark, problem, mode):
    shape, p = problem
    part(benchmark, shape, mode, "forward", lambda: p.forward(training=mode == "train"))


def test_backward_kernel(benchmark, problem):
    shape, p = problem
    part(benchmark, shape, "train", "backward", p.backward)


def test_cell_math(benchmark, problem):
    shape, p = problem
    N, T, H = p.outputs.shape
    xw = np.zeros((N * T, 4 * H), np.float32)
    z, bias = np.zeros((N, 4 * H), np.float32), np.zeros(4 * H, np.float32)
    out, h, gates = np.empty_like(p.outputs), np.empty((N, H), np.float32), np.empty((N, 0, 4 * H), np.float32)
    forward, _ = cell_math_loops(*p.codes)
    part(benchmark, shape, "fwd", "cell_math",
         lambda: forward(xw, bias, z, p.zeros.copy(), h, out, gates))


def test_cell_math_backward(benchmark, problem):
    shape, p = problem
    _, c_seq, gates = p.saved
    N, T, H = p.outputs.shape
    d_xw = np.empty((N * T, 4 * H), np.float32)
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
    from fusedlstm.kernels.cpu import steps

    cell_forward, cell_backward = steps._cell_row_forward, steps._cell_row_backward

    @numba.njit(error_model="numpy")
    def forward(xw, bias, z, c, h, outputs, gates):
        """Forward cell math of all [N, T] rows and steps, pre-activations `xw` [N*T, 4H]
        (+ z = 0 + bias)."""
        N, T, _ = outputs.shape
        width = z.shape[1] // 4
        for t in range(T):
            for n in range(N):
                cell_forward(xw, n * T + t, bias, z, n, width, c, h, n, t, outputs, gates,
                             activation, recurrent_activation)

    @numba.njit(error_model="numpy")
    def backward(gates, c_seq, d_outputs, carried, dh, dc, d_xw):
        """Backward cell math of all [N, T] rows and steps, in reverse time, into d_xw
        [N*T, 4H]."""
        N, T, _ = d_outputs.shape
        for t in range(T - 1, -1, -1):
            for n in range(N):
                cell_backward(n, t, n, n * T + t, gates, c_seq, d_outputs, carried, dh, dc,
                              d_xw, activation, recurrent_activation)

    return forward, backward
