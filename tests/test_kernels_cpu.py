"""The CPU kernels on their own: gate math accuracy, the GEMM tile, the blocks
of rows and the recurrence against the float64 reference, without a framework
in between."""

import re

import numpy as np
import pytest
from numba import njit

from fusedlstm.testing import reference
from fusedlstm.kernels import cpu
from fusedlstm.kernels.cpu import panels, steps
from fusedlstm.kernels import gates
from fusedlstm.kernels.cpu import threads
from fusedlstm.kernels.cpu.tile import LANES, make_tile

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


_TILES = {rows: make_tile(rows, 2, unroll) for rows, unroll in ((8, 1), (4, 2), (1, 4))}
_tile_8, _tile_4, _tile_1 = _TILES[8], _TILES[4], _TILES[1]


@njit
def tile_product(rows, a, b_panel, c):
    """c[:rows] = a[:rows] @ b_panel through the tile of that many rows (lda = a's width)."""
    depth = a.shape[1]
    if rows == 8:
        _tile_8(a, 0, depth, b_panel, 0, c, 0, c.shape[1], depth)
    elif rows == 4:
        _tile_4(a, 0, depth, b_panel, 0, c, 0, c.shape[1], depth)
    else:
        _tile_1(a, 0, depth, b_panel, 0, c, 0, c.shape[1], depth)


@pytest.mark.parametrize("rows", [1, 4, 8])
@pytest.mark.parametrize("depth", [1, 3, 17, 256])
def test_tile_matches_float64_product(rows, depth):
    rng = np.random.default_rng(depth)
    a = rng.normal(size=(rows, depth)).astype("float32")
    b = rng.normal(size=(depth, 2 * LANES)).astype("float32")
    c = np.full((rows, 2 * LANES), np.nan, "float32")
    tile_product(rows, a, b, c)
    exact = a.astype("float64") @ b.astype("float64")
    bound = 4 * np.finfo("float32").eps * (np.abs(a) @ np.abs(b)).max()
    assert np.abs(c - exact).max() <= bound


def test_tile_keeps_its_accumulators_in_vector_registers():
    """The tile is only fast if LLVM keeps it in registers: vector multiply-adds,
    no spills to the stack inside the loop."""
    for rows in (8, 4, 1):
        tile_product(rows, np.ones((rows, 5), "float32"), np.ones((5, 2 * LANES), "float32"),
                     np.empty((rows, 2 * LANES), "float32"))
    asm = "\n".join(tile_product.inspect_asm().values())
    fmas = re.findall(r"vfmadd\w*ps\s+[^\n]*%([xyz])mm", asm)
    assert len(fmas) >= 16 + 8 + 8
    assert set(fmas) <= {"y", "z"}, "the multiply-adds must work on 256- or 512-bit vectors"
    fma_loops = [loop for loop in loops(asm.splitlines()) if any("vfmadd" in line for line in loop)]
    assert len(fma_loops) >= 3
    for loop in fma_loops:
        assert not [line for line in loop if "(%rsp)" in line], "a tile spills inside its loop"


def loops(lines):
    """Each loop of an assembly listing: the lines from a label to a jump back to it."""
    labels = {}
    found = []
    for index, line in enumerate(lines):
        label = re.match(r"^(\.\w+):", line)
        if label:
            labels[label.group(1)] = index
        jump = re.match(r"^\s+j\w+\s+(\.\w+)$", line)
        if jump and jump.group(1) in labels:
            found.append(lines[labels[jump.group(1)]:index + 1])
    return found


def random_problem(rng, N, T, C, H):
    x = rng.normal(size=(N, T, C)).astype("float32")
    W = rng.normal(0, 0.5, (C, 4 * H)).astype("float32")
    U = rng.normal(0, 0.5, (H, 4 * H)).astype("float32")
    b = rng.normal(0, 0.5, 4 * H).astype("float32")
    h0, c0 = (rng.normal(size=(N, H)).astype("float32") for _ in range(2))
    return x, W, U, b, h0, c0


def assert_close_to_float64(got, want, name):
    """Within float32 rounding of values of this magnitude, summed over a few hundred terms."""
    want = np.asarray(want, np.float64)
    bound = 64 * np.finfo("float32").eps * max(1.0, np.abs(want).max())
    assert np.abs(got - want).max() <= bound, name


@pytest.mark.parametrize("zero_output", [False, True])
@pytest.mark.parametrize("masked,dropped", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("N,H", [(5, 6), (37, 40)])
def test_forward_and_gradients_match_reference(masked, dropped, zero_output, N, H):
    rng = np.random.default_rng(1)
    T, C = 9, 4
    x, W, U, b, h0, c0 = random_problem(rng, N, T, C, H)
    mask = rng.random((N, T)) > 0.3 if masked else None
    rmask = (rng.random((4, N, H)) > 0.3).astype("float32") / 0.7 if dropped else None
    imask = (rng.random((4, N, C)) > 0.2).astype("float32") / 0.8 if dropped else None
    seq, h, c, tape = reference.lstm_forward(x, W, U, b, h0, c0, mask, rmask, imask,
                                             zero_output_for_mask=zero_output)
    xw = np.concatenate([(x * (1 if imask is None else imask[g][:, None])) @ W[:, g * H:(g + 1) * H]
                         for g in range(4)], axis=-1) + b
    out, h_n, c_n, saved = cpu.forward(xw.astype("float32"), U, h0, c0, mask, rmask,
                                       gates.TANH, gates.SIGMOID, zero_output, True)
    for name, got, want in (("outputs", out, seq), ("h_n", h_n, h), ("c_n", c_n, c)):
        assert_close_to_float64(got, want, name)
    d_seq = rng.normal(size=seq.shape)
    d_h, d_c = rng.normal(size=h.shape), rng.normal(size=c.shape)
    want = reference.lstm_backward(tape, d_seq, d_h, d_c, zero_output_for_mask=zero_output)
    d_xw, d_h0, d_c0 = cpu.backward(U, mask, rmask, gates.TANH, gates.SIGMOID, zero_output,
                                    saved, d_seq.astype("float32"), d_h.astype("float32"),
                                    d_c.astype("float32"))
    got = {"h0": d_h0, "c0": d_c0, "bias": d_xw.sum((0, 1)),
           "kernel": weight_grad(x, d_xw, imask), "recurrent_kernel": weight_grad(saved[0], d_xw, rmask),
           "x": sum((d_xw[..., g * H:(g + 1) * H] @ W[:, g * H:(g + 1) * H].T)
                    * (1 if imask is None else imask[g][:, None]) for g in range(4))}
    for name, g in got.items():
        assert_close_to_float64(g, want[name], name)


def weight_grad(inputs, d_xw, masks):
    """[K, 4H]: sum over rows and steps of (inputs * masks[g]).T @ d_xw_g, in float64."""
    K, H = inputs.shape[-1], d_xw.shape[-1] // 4
    blocks = [((inputs * (1 if masks is None else masks[g][:, None])).reshape(-1, K).T
               .astype("float64") @ d_xw[..., g * H:(g + 1) * H].reshape(-1, H))
              for g in range(4)]
    return np.concatenate(blocks, axis=1)


@pytest.mark.parametrize("dropped", [False, True])
def test_results_do_not_depend_on_how_rows_are_cut_into_blocks(dropped):
    rng = np.random.default_rng(4)
    N, T, H = 21, 5, 37
    xw = rng.normal(size=(N, T, 4 * H)).astype("float32")
    U = rng.normal(0, 0.3, (H, 4 * H)).astype("float32")
    h0, c0 = (rng.normal(size=(N, H)).astype("float32") for _ in range(2))
    mask = rng.random((N, T)) > 0.3
    rmask = (rng.random((4, N, H)) > 0.3).astype("float32") if dropped else np.zeros((0, N, H), "float32")
    d_out = rng.normal(size=(N, T, H)).astype("float32")
    forward_block, backward_block = steps.block_kernels(gates.TANH, gates.SIGMOID)
    results = []
    for cuts in ([0, N], [0, 8, 16, N], [0, 1, 5, 13, N]):
        out, h_n, c_n = (np.empty(s, "float32") for s in ((N, T, H), (N, H), (N, H)))
        h_in, c_seq = np.empty((N, T, H), "float32"), np.empty((N, T + 1, H), "float32")
        gate_acts = np.empty((N, T, 4 * H), "float32")
        d_xw, d_h0, d_c0 = np.empty_like(xw), np.empty_like(h0), np.empty_like(c0)
        for r0, r1 in zip(cuts[:-1], cuts[1:]):
            forward_block(r0, r1, xw, panels.pack_forward(U), h0, c0, mask, rmask, False,
                          out, h_n, c_n, h_in, c_seq, gate_acts)
            backward_block(r0, r1, panels.pack_backward(U), mask, rmask, False, c_seq, gate_acts,
                           d_out, h0, c0, d_xw, d_h0, d_c0)
        results.append((out, h_n, c_n, h_in, d_xw, d_h0, d_c0))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(b, a, atol=2e-6)


def test_inference_saves_nothing():
    rng = np.random.default_rng(2)
    x, W, U, b, h0, c0 = random_problem(rng, 3, 4, 2, 5)
    out, h_n, _, saved = cpu.forward((x @ W + b).astype("float32"), U, h0, c0, None, None,
                                     0, 1, False, False)
    assert saved is None
    np.testing.assert_array_equal(out[:, -1], h_n)


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
    xw = (x @ W + b).astype("float32")
    out = [np.empty(shape, "float32") for shape in ((3, 4, 5), (3, 5), (3, 5))]
    results = cpu.forward(xw, U, h0, c0, None, None, 0, 1, False, False, out=out)
    assert all(r is o for r, o in zip(results[:3], out))
    np.testing.assert_array_equal(out[0], cpu.forward(xw, U, h0, c0, None, None, 0, 1,
                                                      False, False)[0])


def test_a_wrong_result_buffer_is_a_clear_error():
    rng = np.random.default_rng(7)
    x, W, U, b, h0, c0 = random_problem(rng, 3, 4, 2, 5)
    xw = (x @ W + b).astype("float32")
    out = [np.empty((3, 4, 6), "float32")]
    with pytest.raises(ValueError, match=r"shape \(3, 4, 5\).*Received: shape=\(3, 4, 6\)"):
        cpu.forward(xw, U, h0, c0, None, None, 0, 1, False, False, out=out)
    with pytest.raises(ValueError, match="float32.*Received.*float64"):
        cpu.forward(xw, U, h0, c0, None, None, 0, 1, False, False,
                    out=[np.empty((3, 4, 5), "float64")])
