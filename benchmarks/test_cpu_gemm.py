"""The machine's sgemm rates: the peak, and the GEMMs of the layer at each shape.

`test_peak_sgemm`: one large square product on every usable thread, NumPy
(OpenBLAS) and torch (MKL): the best of them is the machine's measured peak, from
which the floor of every shape is computed (`run_cpu.py`, `kernel_report.py`).

`test_gemm`: per shape, the GEMMs the layer cannot avoid, each library on one thread
and on all of them; together they do the layer's FLOPs (forward: `projection` +
`forward`; training: all five):

- `projection`: [N*T, C] @ [C, 4H]; `input_grad`: [N*T, 4H] @ [4H, C];
- `forward`: T per-step products [N, H] @ [H, 4H];
- `backward_dh`: T per-step products [N, 4H] @ [4H, H];
- `weight_grads`: [C, T*N] @ [T*N, 4H] and [H, T*N] @ [T*N, 4H].

NumPy and SciPy (`blas.sgemm`) run with `--framework fusedlstm` or `onnxruntime`,
`torch.mm` with `--framework torch`, in its own process. `kernel_report.py` turns
the medians into GFLOP/s and sets the kernels' time (`test_cpu_breakdown.py`)
against the fastest library's.
"""

import contextlib
import os

import numpy as np
import pytest
import threadpoolctl

import cases

THREADS = {"1thread": 1, "all_threads": len(os.sched_getaffinity(0))}
LIBRARIES = {"fusedlstm": ("numpy", "scipy"), "onnxruntime": ("numpy",), "torch": ("torch",),
             "keras": ()}
GEMMS = ("projection", "forward", "backward_dh", "input_grad", "weight_grads")
PEAK_SIZE = 256 if cases.QUICK else 2048
EPS32 = float(np.finfo(np.float32).eps)


def gemm_flops(shape, gemm):
    N, T, C, H = cases.SHAPES[shape]
    depth = {"projection": C, "input_grad": C, "forward": H, "backward_dh": H,
             "weight_grads": C + H}[gemm]
    return 2 * T * N * depth * 4 * H


def float32_rounding_allowance(ref, terms):
    """What float32 rounding may move a sum of `terms` products by: eps32 * (8 + 2 *
    sqrt(terms)) * max(1, max|ref|), the error model of `tests/parity.py` (which
    explains it): an error growing like sqrt(terms), in any summation order."""
    return EPS32 * (8 + 2 * np.sqrt(terms)) * max(1.0, np.abs(ref).max(initial=0))


def assert_product_close(a, b, out):
    """`out` is `a @ b` within float32 rounding of a sum as deep as `a`'s rows are long."""
    ref = a.astype(np.float64) @ b.astype(np.float64)
    error = np.abs(out - ref).max(initial=0)
    allowed = float32_rounding_allowance(ref, a.shape[1])
    assert error <= allowed, f"product off by {error:.3g} (float32 rounding allows {allowed:.3g})"


def operands(shape, gemm):
    """`[(a, b, out), ...]`: every product of `gemm` at `shape` is one `a @ b` into `out`."""
    N, T, C, H = cases.SHAPES[shape]
    rng = np.random.default_rng(0)

    def normal(*dims):
        return rng.standard_normal(dims).astype(np.float32)

    if gemm in ("projection", "input_grad"):
        depth, width = (C, 4 * H) if gemm == "projection" else (4 * H, C)
        return [(normal(N * T, depth), normal(depth, width),
                 np.empty((N * T, width), np.float32))]
    if gemm == "forward":
        a, b = normal(N, H), normal(H, 4 * H)
        return [(a, b, np.empty((N, 4 * H), np.float32))] * T
    if gemm == "backward_dh":
        a, b = normal(N, 4 * H), normal(4 * H, H)
        return [(a, b, np.empty((N, H), np.float32))] * T
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


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_peak_sgemm(benchmark, framework, library):
    """A [PEAK_SIZE, PEAK_SIZE] square product on every usable thread."""
    if library not in LIBRARIES[framework]:
        pytest.skip(f"{library} is timed in another process")
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((PEAK_SIZE, PEAK_SIZE)).astype(np.float32) for _ in "ab")
    products = [(a, b, np.empty_like(a))]
    run = RUNNERS[library](products)
    threads = THREADS["all_threads"]
    with thread_limit(library, threads):
        run()
        assert_product_close(*products[0])
        benchmark.group = "peak_sgemm"
        benchmark.name = f"{library}/{threads}"
        benchmark.extra_info.update(kind="peak", library=library, threads=threads,
                                    size=PEAK_SIZE, flops=2 * PEAK_SIZE ** 3)
        benchmark.pedantic(run, rounds=cases.ROUNDS, warmup_rounds=cases.WARMUP_ROUNDS,
                           iterations=1)


@pytest.mark.parametrize("threads", sorted(THREADS))
@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("library", ["numpy", "scipy", "torch"])
@pytest.mark.parametrize("shape", sorted(cases.SHAPES))
def test_gemm(benchmark, framework, shape, library, gemm, threads):
    if library not in LIBRARIES[framework]:
        pytest.skip(f"{library} is timed in another process")
    products = operands(shape, gemm)
    run = RUNNERS[library](products)
    run()
    # The per-step GEMMs repeat one product T times.
    for a, b, out in products[:1] if gemm in ("forward", "backward_dh") else products:
        assert_product_close(a, b, out)
    benchmark.group = f"{shape}/gemm/{gemm}"
    benchmark.name = f"{library}/{threads}"
    benchmark.extra_info.update(shape=shape, kind="gemm", library=library, gemm=gemm,
                                threads=THREADS[threads], flops=gemm_flops(shape, gemm))
    with thread_limit(library, THREADS[threads]):
        benchmark.pedantic(run, rounds=cases.ROUNDS, warmup_rounds=cases.WARMUP_ROUNDS,
                           iterations=1)
