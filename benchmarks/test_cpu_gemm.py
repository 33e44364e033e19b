"""The fused CPU kernels against the machine's fastest sgemm doing the same FLOPs.

Per shape, the GEMMs the layer cannot avoid, each library on one thread
and on all of them:

- `projection`: [N*T, C] @ [C, 4H], the input projection;
- `forward`: T per-step products [N, H] @ [H, 4H];
- `backward_dh`: T per-step products [N, 4H] @ [4H, H];
- `backward_dx`: [N*T, 4H] @ [4H, C], the inputs' gradient;
- `weight_grads`: [C, T*N] @ [T*N, 4H] and [H, T*N] @ [T*N, 4H].

NumPy and SciPy (`blas.sgemm`) run with `--framework fusedlstm`, which also
times the kernels (`forward` without saving; `forward` with saving plus
`backward`); `torch.mm` runs with `--framework torch`, in its own process.
`kernel_report.py` turns the medians into GFLOP/s and the kernel's time over
the fastest library's.
"""

import contextlib
import os

import numpy as np
import pytest
import threadpoolctl

import cases

ROUNDS = 7
THREADS = {"1thread": 1, "all_threads": len(os.sched_getaffinity(0))}
LIBRARIES = {"fusedlstm": ("numpy", "scipy"), "torch": ("torch",), "keras": ()}


def gemm_flops(shape, gemm):
    N, T, C, H = cases.SHAPES[shape]
    if gemm == "weight_grads":
        return 2 * T * N * (C + H) * 4 * H
    if gemm in ("projection", "backward_dx"):
        return 2 * T * N * C * 4 * H
    return 2 * T * N * H * 4 * H


def operands(shape, gemm):
    """`[(a, b, out), ...]`: every product of `gemm` at `shape` is one `a @ b` into `out`."""
    N, T, C, H = cases.SHAPES[shape]
    rng = np.random.default_rng(0)

    def normal(*dims):
        return rng.standard_normal(dims).astype(np.float32)

    if gemm == "forward":
        a, b = normal(N, H), normal(H, 4 * H)
        return [(a, b, np.empty((N, 4 * H), np.float32))] * T
    if gemm == "backward_dh":
        a, b = normal(N, 4 * H), normal(4 * H, H)
        return [(a, b, np.empty((N, H), np.float32))] * T
    if gemm == "projection":
        return [(normal(N * T, C), normal(C, 4 * H), np.empty((N * T, 4 * H), np.float32))]
    if gemm == "backward_dx":
        return [(normal(N * T, 4 * H), normal(4 * H, C), np.empty((N * T, C), np.float32))]
    d_xw = normal(T * N, 4 * H)
    return [(np.ascontiguousarray(normal(T * N, K).T), d_xw, np.empty((K, 4 * H), np.float32))
            for K in (C, H)]


def numpy_products(products):
    def run():
        for a, b, out in products:
            np.matmul(a, b, out=out)
    return run


def scipy_products(products):
    """`a @ b` as `sgemm(b.T, a.T)`: column-major views of the row-major arrays, no copies."""
    from scipy.linalg import blas

    transposed = [(a.T, b.T, out.T) for a, b, out in products]

    def run():
        for a_t, b_t, out_t in transposed:
            blas.sgemm(1.0, b_t, a_t, c=out_t, overwrite_c=True)
    return run


def torch_products(products):
    import torch

    tensors = [tuple(torch.from_numpy(m) for m in p) for p in products]

    def run():
        for a, b, out in tensors:
            torch.mm(a, b, out=out)
    return run


RUNNERS = {"numpy": numpy_products, "scipy": scipy_products, "torch": torch_products}


def thread_limit(library, threads):
    """A context that runs `library` on `threads` threads."""
    if library == "torch":
        return torch_threads(threads)
    return threadpoolctl.threadpool_limits(limits=threads, user_api="blas")


@contextlib.contextmanager
def torch_threads(threads):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", sorted(THREADS))
@pytest.mark.parametrize("gemm", ["projection", "forward", "backward_dh", "backward_dx",
                                  "weight_grads"])
@pytest.mark.parametrize("library", ["numpy", "scipy", "torch"])
@pytest.mark.parametrize("shape", sorted(cases.SHAPES))
def test_gemm(benchmark, framework, shape, library, gemm, threads):
    if library not in LIBRARIES[framework]:
        pytest.skip(f"{library} is timed in another process")
    products = operands(shape, gemm)
    run = RUNNERS[library](products)
    a, b, out = products[0]
    run()
    want = a.astype(np.float64) @ b
    # float32 rounding of a sum of a.shape[1] products (the error model of tests/parity.py)
    allowed = np.finfo(np.float32).eps * (8 + 2 * np.sqrt(a.shape[1])) * np.abs(want).max()
    assert np.abs(out - want).max() <= allowed
    benchmark.group = f"{shape}/gemm/{gemm}"
    benchmark.name = f"{library}/{threads}"
    benchmark.extra_info.update(shape=shape, kind="gemm", library=library, gemm=gemm,
                                threads=THREADS[threads], flops=gemm_flops(shape, gemm))
    with thread_limit(library, THREADS[threads]):
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("threads", sorted(THREADS))
@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("shape", sorted(cases.SHAPES))
def test_kernel(benchmark, framework, shape, mode, threads):
    if framework != "fusedlstm":
        pytest.skip("the kernels are timed with --framework fusedlstm")
    from fusedlstm.kernels.cpu.threads import set_thread_count

    p = cases.KernelProblem(shape)
    if mode == "train":
        def run():
            p.forward(training=True)
            p.backward()
    else:
        def run():
            p.forward(training=False)
    benchmark.group = f"{shape}/gemm/kernel"
    benchmark.name = f"kernel_{mode}/{threads}"
    benchmark.extra_info.update(shape=shape, kind="kernel", mode=mode, threads=THREADS[threads])
    set_thread_count(THREADS[threads])
    try:
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    finally:
        set_thread_count(None)
