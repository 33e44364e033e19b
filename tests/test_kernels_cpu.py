"""The CPU kernels on their own: gate math accuracy, the GEMM tile, the blocks
of rows and the recurrence against the float64 reference, without a framework
in between."""

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from fusedlstm.testing import reference
from fusedlstm.kernels import cpu
from fusedlstm.kernels.cpu import panels, steps
from fusedlstm.kernels import gates
from fusedlstm.kernels.cpu import threads

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "platforms"))
import kernel_check  # noqa: E402  (tests/platforms: the same checks, without Keras)

BACKEND_INDEPENDENT = True  # see conftest.py

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


_tile_a, _tile_b, _tile_c = panels.TILES
_ROWS = tuple(rows for rows, _ in panels.TILE_SHAPES)


@njit
def tile_product(index, a, b_panel, c):
    """c[:rows] = a[:rows] @ b_panel through tile `index` of `panels.TILES` (lda = a's width)."""
    depth = a.shape[1]
    if index == 0:
        _tile_a(a, 0, depth, b_panel, 0, c, 0, c.shape[1], depth)
    elif index == 1:
        _tile_b(a, 0, depth, b_panel, 0, c, 0, c.shape[1], depth)
    else:
        _tile_c(a, 0, depth, b_panel, 0, c, 0, c.shape[1], depth)


@pytest.mark.parametrize("index", range(len(_ROWS)))
@pytest.mark.parametrize("depth", [1, 3, 17, 256])
def test_tile_matches_float64_product(index, depth):
    rows = _ROWS[index]
    rng = np.random.default_rng(depth)
    a = rng.normal(size=(rows, depth)).astype("float32")
    b = rng.normal(size=(depth, panels.PANEL)).astype("float32")
    c = np.full((rows, panels.PANEL), np.nan, "float32")
    tile_product(index, a, b, c)
    exact = a.astype("float64") @ b.astype("float64")
    bound = 4 * np.finfo("float32").eps * (np.abs(a) @ np.abs(b)).max()
    assert np.abs(c - exact).max() <= bound


def test_tiles_cover_a_block_of_rows_and_the_panel_is_whole_vectors():
    assert _ROWS[-1] == 1 and list(_ROWS) == sorted(_ROWS, reverse=True)
    # A block of rows (a multiple of 8) takes the two larger tiles only.
    assert threads.MIN_ROWS_PER_BLOCK % _ROWS[0] % _ROWS[1] == 0
    assert panels.PANEL == panels.VECTORS * panels.TARGET.lanes
    for rows, unroll in panels.TILE_SHAPES:
        assert rows * panels.VECTORS * unroll + panels.VECTORS + 1 <= panels.TARGET.registers


def assert_tiles_stay_in_registers(assembly, isa):
    """The tiles are only fast if LLVM keeps them in registers: multiply-adds on the
    ISA's full vectors, and no stack access inside their loops."""
    register = {"avx512": "z", "avx2": "y", "neon": "v"}[isa]
    for name, counts in assembly.items():
        fmas = counts["fma"]
        assert fmas[register] > 0 and sum(fmas.values()) == fmas[register], (name, counts)
        assert counts["fmaf_calls"] == 0 and counts["loops"] >= 1, (name, counts)
        # panel_products reloads an integer from the stack in one loop on AVX-512 (as
        # before the tiles followed the ISA); no vector spills or reloads anywhere.
        spills = "vector_stack_in_loops" if name == "panel_products" else "stack_in_loops"
        assert counts[spills] == 0, f"{name} spills inside its loop: {counts}"
    assert assembly["panel_products"]["fma"][register] >= 32


def test_tile_keeps_its_accumulators_in_vector_registers():
    """On this machine's own ISA; the other x86 ISAs run in subprocesses below (AArch64:
    `tests/platforms/aarch64_root.sh ROOT --asm` shows the same counts under qemu)."""
    if panels.TARGET.isa not in ("avx512", "avx2", "neon"):
        pytest.skip(f"the assembly is checked on x86 AVX-512 and AVX2 and on NEON; Numba "
                    f"compiles for {panels.TARGET.isa} ({panels.TARGET.arch}, "
                    f"{panels.TARGET.cpu}) here")
    assert_tiles_stay_in_registers(kernel_check.tile_assembly(), panels.TARGET.isa)


def run_kernel_check(tmp_path, cpu_name, *options):
    """`tests/platforms/kernel_check.py --json` under NUMBA_CPU_NAME=cpu_name with that
    CPU's own features only (NUMBA_CPU_FEATURES="": without it Numba would add the
    host's, AVX-512 included), in a cache folder of its own so that kernels compiled
    for different ISAs never share one."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"NUMBA_CPU_NAME={cpu_name} is an x86 CPU; this is {platform.machine()}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU_")}
    env.update(NUMBA_CPU_NAME=cpu_name, NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, kernel_check.__file__, "--json", *options],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_avx2_tiles_use_ymm_without_spills(tmp_path):
    report = run_kernel_check(tmp_path, "haswell", "--asm")
    assert report["target"]["isa"] == "avx2" and report["target"]["panel"] == 16, report["target"]
    assert_tiles_stay_in_registers(report["assembly"], "avx2")


def test_without_fma_the_tiles_multiply_and_add_instead_of_calling_libm(tmp_path):
    report = run_kernel_check(tmp_path, "generic", "--asm")
    assert report["target"]["fma"] is False, report["target"]
    for name, counts in report["assembly"].items():
        assert counts["fmaf_calls"] == 0 and counts["mul_add"] > 0, (name, counts)
        assert counts["vector_stack_in_loops"] == 0, (name, counts)


@pytest.mark.parametrize("cpu_name,isa", [("haswell", "avx2"), ("generic", "sse")])
def test_kernels_match_reference_on_other_x86_isas(tmp_path, cpu_name, isa):
    """Forward and backward against the float64 reference, error model as above,
    at (N, T, H) = (1, 7, 3), (5, 9, 17) masked and (16, 20, 64)."""
    report = run_kernel_check(tmp_path, cpu_name)
    assert report["target"]["isa"] == isa, report["target"]
    failed = {tuple(case["shape"]): {k: e for k, e in case["errors"].items() if e[0] > e[1]}
              for case in report["cases"] if not case["pass"]}
    assert report["pass"] and not failed, failed


def random_problem(rng, N, T, C, H, scale=0.5):
    x = rng.normal(size=(N, T, C)).astype("float32")
    W = rng.normal(0, scale, (C, 4 * H)).astype("float32")
    U = rng.normal(0, scale, (H, 4 * H)).astype("float32")
    b = rng.normal(0, scale, 4 * H).astype("float32")
    h0, c0 = (rng.normal(size=(N, H)).astype("float32") for _ in range(2))
    return x, W, U, b, h0, c0


def left_padded_mask(rng, N, T):
    """[N, T]: each row's first steps masked (a random count, some rows none, one all)."""
    starts = rng.integers(0, T + 1, N)
    starts[0] = 0
    starts[-1] = T
    return np.arange(T)[None, :] >= starts[:, None]


def assert_matches_reference(N, T, C, H, mask=None, dropped=False, zero_output=False,
                             activation="tanh", recurrent_activation="sigmoid", seed=1,
                             scale=0.5):
    """Forward and backward of the CPU drivers against the float64 reference, each value
    within the error model of `tests/parity.py` for the depth of its sums (weights of
    standard deviation `scale`)."""
    rng = np.random.default_rng(seed)
    x, W, U, b, h0, c0 = random_problem(rng, N, T, C, H, scale)
    rmask = (rng.random((4, N, H)) > 0.3).astype("float32") / 0.7 if dropped else None
    imask = (rng.random((4, N, C)) > 0.2).astype("float32") / 0.8 if dropped else None
    act, ract = gates.ACTIVATION_CODES[activation], gates.ACTIVATION_CODES[recurrent_activation]
    seq, h, c, tape = reference.lstm_forward(x, W, U, b, h0, c0, mask, rmask, imask, activation,
                                             recurrent_activation,
                                             zero_output_for_mask=zero_output)
    out, h_n, c_n, saved = cpu.forward(x, W, b, U, h0, c0, mask, imask, rmask, act, ract,
                                       zero_output, True)
    d_seq = rng.normal(size=seq.shape).astype("float32")
    d_h, d_c = (rng.normal(size=h.shape).astype("float32") for _ in range(2))
    want = reference.lstm_backward(tape, d_seq, d_h, d_c, activation, recurrent_activation,
                                   zero_output_for_mask=zero_output)
    grads = cpu.backward(x, W, U, mask, imask, rmask, act, ract, zero_output, saved, d_seq, d_h,
                         d_c)
    got = {"outputs": (out, seq), "h_n": (h_n, h), "c_n": (c_n, c)}
    for name, value in zip(("x", "kernel", "recurrent_kernel", "bias", "h0", "c0"), grads):
        got["d_" + name] = (value, want[name])
    for name, (value, expected) in got.items():
        assert value.shape == expected.shape, (name, value.shape, expected.shape)
        error = np.abs(value - expected).max(initial=0)
        allowed = kernel_check.allowance(expected, kernel_check.summed_terms(name, N, T, C, H))
        assert error <= allowed, f"{name}: error {error:.3g} > {allowed:.3g}"


@pytest.mark.parametrize("zero_output", [False, True])
@pytest.mark.parametrize("masked,dropped", [(False, False), (True, False), (True, True),
                                            (False, True)])
@pytest.mark.parametrize("N,T,C,H", [(5, 9, 4, 6), (37, 11, 19, 40)])
def test_forward_and_gradients_match_reference(masked, dropped, zero_output, N, T, C, H):
    mask = np.random.default_rng(2).random((N, T)) > 0.3 if masked else None
    assert_matches_reference(N, T, C, H, mask, dropped, zero_output)


@pytest.mark.parametrize("zero_output", [False, True])
def test_left_padded_sequences_match_reference(zero_output):
    N, T = 13, 10
    assert_matches_reference(N, T, 3, 9, left_padded_mask(np.random.default_rng(3), N, T),
                             dropped=True, zero_output=zero_output)


@pytest.mark.parametrize("activation,recurrent_activation", [
    ("softsign", "hard_sigmoid"), ("relu", "sigmoid"), ("linear", "tanh")])
def test_activation_pairs_match_reference(activation, recurrent_activation):
    """Weights of Glorot's scale: with an unbounded cell activation (relu, linear), weights
    of 0.5 make the recurrence grow its own rounding errors step after step, which the
    error model (like Keras's initializers) does not count on."""
    assert_matches_reference(9, 7, 5, 11, activation=activation,
                             recurrent_activation=recurrent_activation, scale=0.25)


def test_several_time_chunks_match_reference():
    """T over three chunks, the last one short: chunk boundaries in both directions."""
    N, C, H = 8, 7, 33
    width = -(-H // panels.PANEL) * panels.PANEL
    chunk = steps.CHUNK_FLOATS // (N * 4 * width)
    backward_chunk = max(chunk, -(-steps.WEIGHT_GRADIENT_DEPTH // N))
    T = 2 * backward_chunk + chunk // 2 + 1
    assert 1 < chunk < T and 1 < backward_chunk < T // 2
    assert_matches_reference(N, T, C, H, np.random.default_rng(5).random((N, T)) > 0.2, True)


def test_chunks_of_one_step_match_reference(monkeypatch):
    """A block of rows so tall that a chunk is a single step."""
    monkeypatch.setattr(threads, "thread_count", lambda: 1)
    N, T, C, H = 2048, 3, 2, 16
    width = -(-H // panels.PANEL) * panels.PANEL
    assert threads.block_bounds(N, T * 8 * H * (C + H), 1) == [(0, N)]
    assert steps.CHUNK_FLOATS // (N * 4 * width) == 0
    assert_matches_reference(N, T, C, H, dropped=True)


@pytest.mark.parametrize("dropped", [False, True])
def test_results_do_not_depend_on_how_rows_are_cut_into_blocks(dropped):
    rng = np.random.default_rng(4)
    N, T, C, H = 21, 5, 6, 37
    x, W, U, b, h0, c0 = random_problem(rng, N, T, C, H)
    mask = rng.random((N, T)) > 0.3
    imask, rmask = ((rng.random((4 if dropped else 0, N, K)) > 0.3).astype("float32")
                    for K in (C, H))
    d_out = rng.normal(size=(N, T, H)).astype("float32")
    forward_block, backward_block = steps.block_kernels(gates.TANH, gates.SIGMOID)
    width = 4 * -(-H // panels.PANEL) * panels.PANEL
    results = []
    for cuts in ([0, N], [0, 8, 16, N], [0, 1, 5, 13, N]):
        out, h_n, c_n = (np.empty(s, "float32") for s in ((N, T, H), (N, H), (N, H)))
        h_in, c_seq = np.empty((N, T, H), "float32"), np.empty((N, T + 1, H), "float32")
        gate_acts = np.empty((N, T, 4 * H), "float32")
        d_x, d_h0, d_c0 = np.empty_like(x), np.empty_like(h0), np.empty_like(c0)
        parts = [np.zeros((N,) + shape, "float32") for shape in ((C, width), (H, width), (4 * H,))]
        for r0, r1 in zip(cuts[:-1], cuts[1:]):
            forward_block(r0, r1, x, panels.pack_forward(W), b, panels.pack_forward(U), h0, c0,
                          mask, imask, rmask, False, out, h_n, c_n, h_in, c_seq, gate_acts)
            backward_block(r0, r1, 1, x, panels.pack_backward(W), panels.pack_backward(U), mask,
                           imask, rmask, False, h_in, c_seq, gate_acts, d_out, h0, c0, d_x,
                           *parts, d_h0, d_c0)
        results.append((out, h_n, c_n, h_in, d_x, d_h0, d_c0, *(p.sum(0) for p in parts)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(b, a, atol=1e-5 * max(1, np.abs(a).max()))


def test_inference_saves_nothing():
    rng = np.random.default_rng(2)
    x, W, U, b, h0, c0 = random_problem(rng, 3, 4, 2, 5)
    out, h_n, _, saved = cpu.forward(x, W, b, U, h0, c0, None, None, None, 0, 1, False, False)
    assert saved is None
    np.testing.assert_array_equal(out[:, -1], h_n)


def test_backward_is_deterministic_on_several_blocks(monkeypatch):
    """The blocks' weight gradients are summed in a fixed order: the same bits every call."""
    monkeypatch.setattr(threads, "thread_count", lambda: 2)
    rng = np.random.default_rng(8)
    N, T, C, H = 64, 12, 16, 64
    x, W, U, b, h0, c0 = random_problem(rng, N, T, C, H)
    assert len(threads.block_bounds(N, 2 * T * 8 * H * (C + H), 2)) > 1
    out, h_n, c_n, saved = cpu.forward(x, W, b, U, h0, c0, None, None, None, 0, 1, False, True)
    first = cpu.backward(x, W, U, None, None, None, 0, 1, False, saved, out, h_n, c_n)
    for _ in range(3):
        again = cpu.backward(x, W, U, None, None, None, 0, 1, False, saved, out, h_n, c_n)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 32, 100, 1000])
@pytest.mark.parametrize("thread_count", [1, 2, 16])
def test_blocks_cover_every_row_once_in_whole_tiles(rows, thread_count):
    bounds = threads.block_bounds(rows, 1 << 30, thread_count)
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all((r1 - r0) % threads.MIN_ROWS_PER_BLOCK == 0 for r0, r1 in bounds[:-1])
    assert len(bounds) <= max(1, thread_count * threads.BLOCKS_PER_THREAD)


def test_small_work_stays_in_one_block():
    assert threads.block_bounds(64, 100, 2) == [(0, 64)]


def test_an_error_in_a_block_reaches_the_caller():
    seen = []

    def kernel(r0, r1, fail_at):
        seen.append((r0, r1))
        if r0 == fail_at:
            raise ValueError("block failed")

    with pytest.raises(ValueError, match="block failed"):
        threads.run_blocks(kernel, (8,), 32, 1 << 30)
    assert sorted(seen) == threads.block_bounds(32, 1 << 30, threads.thread_count())


def test_results_are_written_into_given_buffers():
    rng = np.random.default_rng(6)
    x, W, U, b, h0, c0 = random_problem(rng, 3, 4, 2, 5)
    inputs = (x, W, b, U, h0, c0, None, None, None, 0, 1, False)
    out = [np.empty(shape, "float32") for shape in ((3, 4, 5), (3, 5), (3, 5))]
    results = cpu.forward(*inputs, False, out=out)
    assert all(r is o for r, o in zip(results[:3], out))
    np.testing.assert_array_equal(out[0], cpu.forward(*inputs, False)[0])
    outputs, h_n, c_n, saved = cpu.forward(*inputs, True)
    grads = (x, W, U, None, None, None, 0, 1, False, saved, outputs, h_n, c_n)
    buffers = [np.empty(shape, "float32") for shape in ((3, 4, 2), (2, 20), (5, 20), (20,))]
    results = cpu.backward(*grads, out=buffers)
    assert all(r is o for r, o in zip(results[:4], buffers))
    for got, want in zip(results, cpu.backward(*grads)):
        np.testing.assert_array_equal(got, want)


def test_a_wrong_result_buffer_is_a_clear_error():
    rng = np.random.default_rng(7)
    x, W, U, b, h0, c0 = random_problem(rng, 3, 4, 2, 5)
    inputs = (x, W, b, U, h0, c0, None, None, None, 0, 1, False, False)
    out = [np.empty((3, 4, 6), "float32")]
    with pytest.raises(ValueError, match=r"shape \(3, 4, 5\).*Received: shape=\(3, 4, 6\)"):
        cpu.forward(*inputs, out=out)
    with pytest.raises(ValueError, match="float32.*Received.*float64"):
        cpu.forward(*inputs, out=[np.empty((3, 4, 5), "float64")])
