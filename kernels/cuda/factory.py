"""The fused LSTM recurrence on CUDA GPUs: persistent forward and backward kernels.

Same contract as `kernels.cpu`: the framework computes `xw = x @ kernel + bias`
for all timesteps, these kernels run only the sequential part, with the same
masking, recurrent dropout and `zero_output_for_mask` semantics, and the host
drivers `forward` and `backward` take the same arguments (plus launch options)
and return the same values.

Design: one launch runs every timestep (a persistent kernel).

1. The H hidden units are cut into slices of `units` units; block `b` owns
   units `[b * units, (b + 1) * units)` for all four gates.
2. The block keeps the recurrent weights its units need in shared memory for
   the whole sequence: the 4 * units columns of `recurrent_kernel` in the
   forward pass, its `units` rows in the backward pass
   (`dh_prev[:, j] = sum_k dz[:, k] * U[j, k]`). When they do not all fit in
   `_WEIGHT_FLOATS` floats, it keeps the first ones and streams the rest
   through L2 every step (the forward pass from a transposed copy of its own
   columns that its prologue writes, so that the loads coalesce).
3. Each step, the block stages the rows of `h` (backward: of the step's gate
   gradients) it needs in shared memory, `_CHUNK` columns at a time, and
   computes register tiles: a group of `lanes` threads owns `_ROWS` batch
   rows times 4 weight columns (the four gates of one unit forward, four
   units backward); each lane sums over a strided part of the inner
   dimension, 16 multiply-adds per 8 shared-memory loads, and a butterfly of
   warp shuffles adds the lanes' partial sums. Then the lanes of the group
   apply the cell math to different rows in parallel (backward: all threads
   over all of the block's cells).
4. A grid-wide barrier (`cuda.cg.this_grid().sync()`, a cooperative launch)
   separates timesteps; `h` is double-buffered in global memory so that one
   barrier per step suffices. The backward pass needs one barrier per step
   too: the pointwise gradients of a step, then the recurrent product.
5. When the whole problem is small, one block runs it with `syncthreads` as
   the barrier (`*_block` kernels, no cooperative launch): the same device
   functions, a cheaper barrier. `*_step` kernels run one step per launch
   over many blocks (the launch boundary is the barrier): the CUDA simulator
   runs blocks one after another, so only they test the multi-block code there.
6. The kernels are compiled once per activation pair (`kernels_for`), so the
   gate math has no runtime branch on the activation. Index arithmetic in the
   inner loops is unsigned, which spares Numba's negative-index wraparound.

The host drivers take NumPy arrays (copied to the device, results copied back
as NumPy: the `kernels.cpu` semantics, which also runs these kernels in the
CUDA simulator) or device arrays: anything with `__cuda_array_interface__`
(PyTorch CUDA tensors, Numba device arrays), a `StridedMemoryView`, or a CUDA
DLPack capsule provider. Device inputs give Numba device arrays back, written
asynchronously on the given stream. Scratch buffers are kept per device,
stream and shape and reused, so a call allocates only its outputs.

Kernels compile on first use, so importing this module needs no GPU.
"""

import functools
import types as pytypes

import numpy as np
from cuda.core.utils import StridedMemoryView
from numba import config, cuda, float32, types, uint64

from ..gates import ACTIVATION_CODES, SIGMOID, TANH, compile_gates

_gates = compile_gates(cuda.jit(device=True, inline="always"))
_cell_forward = _gates.cell_forward
_cell_backward = _gates.cell_backward

# Static shared memory per block is capped at 48 KB (numba-cuda declares no
# more); 1 KB of headroom stays below the cap. The first `_WEIGHT_FLOATS`
# cache weights, the rest stages `_STAGE_ROWS` rows of `_CHUNK` columns.
_SHARED_FLOATS = 12 * 1024 - 256
_CHUNK = 128
_STAGE_ROWS = 32
_WEIGHT_FLOATS = _SHARED_FLOATS - _STAGE_ROWS * _CHUNK
# Batch rows per register tile; a tile holds _ROWS x 4 sums.
_ROWS = 4
_ACC = 4 * _ROWS
_STAGE_TILES = _STAGE_ROWS // _ROWS
_FULL_WARP = 0xFFFFFFFF
# At most 256 threads and 2 blocks per SM: the compiler must keep the kernels
# within 128 registers (checked on the SASS by tests/test_cuda_sass.py), and
# `_grid_shape` sizes cooperative grids from the driver's occupancy answer.
_MAX_THREADS = 256
_LAUNCH_BOUNDS = (_MAX_THREADS, 2)
# One block (block barrier) instead of a cooperative grid when a step needs at
# most this many multiply-adds and the weights fit in one block's cache: a
# grid barrier costs about a microsecond. Tune on the GPU.
_SINGLE_BLOCK_WORK = 1 << 17
_DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged
_SWAP_THREADS = 256
_SWAP_MAX_BLOCKS = 1024
_ZERO = np.float32(0.0)
_U_CHUNK = np.uint64(_CHUNK)
_U_WEIGHT_FLOATS = np.uint64(_WEIGHT_FLOATS)
_U0 = np.uint64(0)
_U1 = np.uint64(1)
_U2 = np.uint64(2)
_U3 = np.uint64(3)
_U4 = np.uint64(4)
_SIMULATED = bool(config.ENABLE_CUDASIM)
_device = cuda.jit(device=True, inline="always")
# The simulator's jit takes no launch bounds.
_kernel = cuda.jit(cache=True) if _SIMULATED else cuda.jit(cache=True,
                                                          launch_bounds=_LAUNCH_BOUNDS)


# ---------------------------------------------------------------------------
# Device functions shared by all kernels.


@_device
def _block_slice(H, units):
    """First unit and number of units owned by this block."""
    first = cuda.blockIdx.x * units
    return first, max(0, min(units, H - first))


@_device
def _group_sum_shuffled(acc, lanes):
    """Gives every lane of a group of `lanes` threads the group's sums of `acc`."""
    offset = lanes // 2
    while offset > 0:
        for a in range(_ACC):
            acc[a] += cuda.shfl_xor_sync(_FULL_WARP, acc[a], offset)
        offset //= 2


@_device
def _group_sum_simulated(acc, lanes):
    """`_group_sum_shuffled` for the CUDA simulator, which has no shuffles."""
    partials = cuda.shared.array((_MAX_THREADS, _ACC), float32)
    tid = cuda.threadIdx.x
    for a in range(_ACC):
        partials[tid, a] = acc[a]
    cuda.syncthreads()
    first = tid - tid % lanes
    for a in range(_ACC):
        total = _ZERO
        for lane in range(first, first + lanes):
            total += partials[lane, a]
        acc[a] = total
    cuda.syncthreads()


_group_sum = _group_sum_simulated if _SIMULATED else _group_sum_shuffled


@_device
def _tile_fma(acc, stage, s, weights, w0, w1, w2, w3):
    """acc[4r + q] += stage[s + r * _CHUNK] * weights[w_q] for r < _ROWS, q < 4."""
    u0, u1, u2, u3 = weights[w0], weights[w1], weights[w2], weights[w3]
    for r in range(_ROWS):
        x = stage[s + uint64(r) * _U_CHUNK]
        acc[4 * r] += x * u0
        acc[4 * r + 1] += x * u1
        acc[4 * r + 2] += x * u2
        acc[4 * r + 3] += x * u3


@_device
def _tile_products(acc, stage, s0, weights, w0, w1, w2, w3, lo, hi, lanes):
    """The inner loop: `_tile_fma` at columns kk = lo, lo + lanes, ... < hi.

    Stage column kk is at `stage[s0 + kk]` (row r `_CHUNK` further per row);
    weight column q at `weights[w_q + kk]`. Unsigned indices; `lanes` is a
    compile-time constant, so the four trips of the unrolled body share their
    addresses (immediate offsets).
    """
    s0, step, kk, hi = uint64(s0), uint64(lanes), uint64(lo), uint64(hi)
    w0, w1, w2, w3 = uint64(w0), uint64(w1), uint64(w2), uint64(w3)
    while kk + step * _U3 < hi:
        for i in range(4):
            k = kk + uint64(i) * step
            _tile_fma(acc, stage, s0 + k, weights, w0 + k, w1 + k, w2 + k, w3 + k)
        kk += step * _U4
    while kk < hi:
        _tile_fma(acc, stage, s0 + kk, weights, w0 + kk, w1 + kk, w2 + kk, w3 + kk)
        kk += step


@_device
def _share_sums(cache, acc, lane, group):
    """Copies each group's sums to its slot of the stage area, for all its lanes.

    The lanes then read the sums they need with a runtime index from shared
    memory (a runtime index into `acc` would put it in local memory).
    """
    cuda.syncthreads()
    if lane == 0:
        for a in range(_ACC):
            cache[_WEIGHT_FLOATS + group * _ACC + a] = acc[a]
    cuda.syncthreads()


@_device
def _stage_rows(stage, src, n_first, rows, c0, width):
    """stage[_WEIGHT_FLOATS + r * _CHUNK + kk] = src[n_first + r, c0 + kk].

    Rows past the end repeat the last row (their sums are never written).
    """
    # Each thread keeps one column and walks rows: unsigned, no division in
    # the loop. With more threads than columns, extra threads start lower
    # rows (a block size that is not a multiple of _CHUNK copies some
    # elements twice, the same value).
    threads, tid = uint64(cuda.blockDim.x), uint64(cuda.threadIdx.x)
    columns = min(threads, _U_CHUNK)
    row_step = max(_U1, threads // _U_CHUNK)
    last, n_first, c0 = uint64(src.shape[0] - 1), uint64(n_first), uint64(c0)
    width, rows = uint64(width), uint64(rows)
    kk = tid % columns
    while kk < width:
        r = tid // columns
        while r < rows:
            stage[_U_WEIGHT_FLOATS + r * _U_CHUNK + kk] = src[min(n_first + r, last), c0 + kk]
            r += row_step
        kk += columns


@_device
def _round_shape(groups, tiles, row_tiles):
    """Row tiles and column tiles per round of register tiles.

    A round gives each group one (row tile, column tile) item; all items of a
    round share the staged rows.
    """
    per_round_rows = max(1, min(groups // max(1, tiles), _STAGE_TILES, row_tiles))
    return per_round_rows, max(1, min(tiles, groups))


@_device
def _copy_units(src, dst, first, width):
    """dst[:, first:first + width] = src[:, first:first + width]."""
    for idx in range(cuda.threadIdx.x, src.shape[0] * width, cuda.blockDim.x):
        n = idx // width
        j = first + idx - n * width
        dst[n, j] = src[n, j]


# ---------------------------------------------------------------------------
# Forward device functions.


@_device
def _forward_unit(t, n, j, z_i, z_f, z_c, z_o, xw, mask, h, h_next, c_prev, c, activation,
                  recurrent_activation, zero_output_for_mask, outputs, h_seq, c_seq, gates):
    """Updates unit j of row n at step t from its recurrent pre-activations z_*."""
    H = h.shape[1]
    save = gates.shape[0] > 0
    if mask.shape[0] > 0 and not mask[t, n]:
        h_next[n, j] = h[n, j]
        c[n, j] = c_prev[n, j]
        if zero_output_for_mask or t == 0:
            outputs[t, n, j] = _ZERO
        else:
            outputs[t, n, j] = outputs[t - 1, n, j]
        if save:
            for g in range(4):
                gates[t, n, g * H + j] = _ZERO
    else:
        i, f, g_, o, c_new, h_new = _cell_forward(
            xw[t, n, j] + z_i, xw[t, n, H + j] + z_f, xw[t, n, 2 * H + j] + z_c,
            xw[t, n, 3 * H + j] + z_o, c_prev[n, j], activation, recurrent_activation)
        c[n, j] = c_new
        h_next[n, j] = h_new
        outputs[t, n, j] = h_new
        if save:
            gates[t, n, j] = i
            gates[t, n, H + j] = f
            gates[t, n, 2 * H + j] = g_
            gates[t, n, 3 * H + j] = o
    if save:
        h_seq[t + 1, n, j] = h_next[n, j]
        c_seq[t + 1, n, j] = c[n, j]


@_device
def _forward_weights(u, u_t, cache, cached_k, first, width):
    """Fills the block's weight cache and its rows of the streamed copy.

    Cache layout: column `g * width + jj` (gate g of unit first + jj) holds
    rows k < cached_k of `U[:, g*H + first + jj]`, contiguous in k. The other
    rows go to `u_t[(g*H + j) * H + k]` (U transposed, flat), read back by
    this block only.
    """
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    H = u.shape[0]
    columns = 4 * width
    for idx in range(tid, columns * H, threads):
        k = idx // columns
        column = idx - k * columns
        gate = column // width
        j = first + column - gate * width
        value = u[k, gate * H + j]
        if k < cached_k:
            cache[column * cached_k + k] = value
        else:
            u_t[(gate * H + j) * H + k] = value


@_device
def _forward_initial_states(first, width, h0, c0, h, c, h_seq, c_seq):
    for idx in range(cuda.threadIdx.x, h0.shape[0] * width, cuda.blockDim.x):
        n = idx // width
        j = first + idx - n * width
        h[n, j] = h0[n, j]
        c[n, j] = c0[n, j]
        if h_seq.shape[0] > 0:
            h_seq[0, n, j] = h0[n, j]
            c_seq[0, n, j] = c0[n, j]


@_device
def _dropout_products(acc, stage, s0, weights, w0, w1, w2, w3, recurrent_mask, n0, c0, lo, hi,
                      lanes):
    """`_tile_products` with per-gate recurrent dropout masks on the staged rows.

    Unsigned indices; the masks come from global memory, so this loop does
    less math per instruction than `_tile_products`.
    """
    last = uint64(recurrent_mask.shape[1] - 1)
    n0, c0, s0, step = uint64(n0), uint64(c0), uint64(s0), uint64(lanes)
    w0, w1, w2, w3 = uint64(w0), uint64(w1), uint64(w2), uint64(w3)
    kk, hi = uint64(lo), uint64(hi)
    while kk < hi:
        k = c0 + kk
        u0, u1, u2, u3 = weights[w0 + kk], weights[w1 + kk], weights[w2 + kk], weights[w3 + kk]
        for r in range(_ROWS):
            n = min(n0 + uint64(r), last)
            x = stage[s0 + uint64(r) * _U_CHUNK + kk]
            acc[4 * r] += x * recurrent_mask[_U0, n, k] * u0
            acc[4 * r + 1] += x * recurrent_mask[_U1, n, k] * u1
            acc[4 * r + 2] += x * recurrent_mask[_U2, n, k] * u2
            acc[4 * r + 3] += x * recurrent_mask[_U3, n, k] * u3
        kk += step


@_device
def _forward_step(t, xw, u_t, cache, cached_k, first, width, lanes, h, h_next, c_prev, c,
                  mask, recurrent_mask, dropout, activation, recurrent_activation,
                  zero_output_for_mask, outputs, h_seq, c_seq, gates):
    """One timestep for the block's units: reads h and c_prev, writes h_next and c.

    `dropout` (a compile-time constant) says whether `recurrent_mask` applies.
    """
    N, H = h.shape
    acc = cuda.local.array(_ACC, float32)
    lane = cuda.threadIdx.x % lanes
    group = cuda.threadIdx.x // lanes
    row_tiles = (N + _ROWS - 1) // _ROWS
    tiles_per_round, units_per_round = _round_shape(cuda.blockDim.x // lanes, width, row_tiles)
    my_tile = group // units_per_round
    # Block-uniform trip counts: every thread reaches each barrier and shuffle.
    for tile0 in range(0, row_tiles, tiles_per_round):
        n_first = tile0 * _ROWS
        n0 = n_first + my_tile * _ROWS
        for unit0 in range(0, width, units_per_round):
            jj = unit0 + group % units_per_round
            active = my_tile < tiles_per_round and n0 < N and jj < width
            j = first + min(jj, width - 1)
            for a in range(_ACC):
                acc[a] = _ZERO
            s0 = _WEIGHT_FLOATS + my_tile * _ROWS * _CHUNK
            for k0 in range(0, H, _CHUNK):
                chunk = min(_CHUNK, H - k0)
                cuda.syncthreads()
                _stage_rows(cache, h, n_first, tiles_per_round * _ROWS, k0, chunk)
                cuda.syncthreads()
                if active:
                    on_chip = min(chunk, max(0, cached_k - k0))
                    jc = min(jj, width - 1) * cached_k + k0
                    gate_stride = width * cached_k
                    jt = j * H + k0
                    if dropout:
                        _dropout_products(acc, cache, s0, cache, jc, jc + gate_stride,
                                          jc + 2 * gate_stride, jc + 3 * gate_stride,
                                          recurrent_mask, n0, k0, lane, on_chip, lanes)
                        _dropout_products(acc, cache, s0, u_t, jt, jt + H * H, jt + 2 * H * H,
                                          jt + 3 * H * H, recurrent_mask, n0, k0,
                                          on_chip + lane, chunk, lanes)
                    else:
                        _tile_products(acc, cache, s0, cache, jc, jc + gate_stride,
                                       jc + 2 * gate_stride, jc + 3 * gate_stride, lane,
                                       on_chip, lanes)
                        _tile_products(acc, cache, s0, u_t, jt, jt + H * H, jt + 2 * H * H,
                                       jt + 3 * H * H, on_chip + lane, chunk, lanes)
            _group_sum(acc, lanes)
            _share_sums(cache, acc, lane, group)
            if active:
                sums = _WEIGHT_FLOATS + group * _ACC
                for r in range(lane, _ROWS, lanes):
                    if n0 + r < N:
                        z = sums + 4 * r
                        _forward_unit(t, n0 + r, j, cache[z], cache[z + 1], cache[z + 2],
                                      cache[z + 3], xw, mask, h, h_next, c_prev, c, activation,
                                      recurrent_activation, zero_output_for_mask, outputs, h_seq,
                                      c_seq, gates)


# ---------------------------------------------------------------------------
# Backward device functions.


@_device
def _backward_weights(u, cache, cached_c, first, width):
    """Cache layout: row jj (unit first + jj) holds columns c < cached_c of `U[first + jj, :]`."""
    for idx in range(cuda.threadIdx.x, width * cached_c, cuda.blockDim.x):
        row = idx // cached_c
        cache[idx] = u[first + row, idx - row * cached_c]


@_device
def _backward_initial_states(first, width, d_h_n, d_c_n, dh, dc, carried):
    for idx in range(cuda.threadIdx.x, dh.shape[0] * width, cuda.blockDim.x):
        n = idx // width
        j = first + idx - n * width
        dh[n, j] = d_h_n[n, j]
        dc[n, j] = d_c_n[n, j]
        carried[n, j] = _ZERO


@_device
def _backward_unit(t, n, j, mask, activation, recurrent_activation, zero_output_for_mask,
                   c_seq, gates, d_outputs, d_xw, dh, dc, carried):
    """Gate gradients of unit j of row n at step t into d_xw; updates dc, carried."""
    H = dh.shape[1]
    d_out = d_outputs[t, n, j]
    if mask.shape[0] > 0 and not mask[t, n]:
        for g in range(4):
            d_xw[t, n, g * H + j] = _ZERO
        if zero_output_for_mask:
            carried[n, j] = _ZERO
        else:
            carried[n, j] += d_out
        return
    dzi, dzf, dzc, dzo, dc_prev = _cell_backward(
        gates[t, n, j], gates[t, n, H + j], gates[t, n, 2 * H + j], gates[t, n, 3 * H + j],
        c_seq[t, n, j], c_seq[t + 1, n, j], d_out + carried[n, j] + dh[n, j], dc[n, j],
        activation, recurrent_activation)
    d_xw[t, n, j] = dzi
    d_xw[t, n, H + j] = dzf
    d_xw[t, n, 2 * H + j] = dzc
    d_xw[t, n, 3 * H + j] = dzo
    dc[n, j] = dc_prev
    carried[n, j] = _ZERO


@_device
def _backward_cells(t, first, width, mask, activation, recurrent_activation,
                    zero_output_for_mask, c_seq, gates, d_outputs, d_xw, dh, dc, carried):
    """Pointwise gradients of step t for the block's units, one cell per thread."""
    for idx in range(cuda.threadIdx.x, dh.shape[0] * width, cuda.blockDim.x):
        n = idx // width
        _backward_unit(t, n, first + idx - n * width, mask, activation, recurrent_activation,
                       zero_output_for_mask, c_seq, gates, d_outputs, d_xw, dh, dc, carried)


@_device
def _fold_gate(total, acc, r, recurrent_mask, g, n, first, rows):
    """total[4r + q] += acc[4r + q] times gate g's dropout mask at (n, unit q)."""
    total[4 * r] += recurrent_mask[g, n, first + rows[0]] * acc[4 * r]
    total[4 * r + 1] += recurrent_mask[g, n, first + rows[1]] * acc[4 * r + 1]
    total[4 * r + 2] += recurrent_mask[g, n, first + rows[2]] * acc[4 * r + 2]
    total[4 * r + 3] += recurrent_mask[g, n, first + rows[3]] * acc[4 * r + 3]


@_device
def _backward_products(t, u_flat, cache, cached_c, first, width, lanes, mask, recurrent_mask,
                       dropout, d_xw, dh):
    """dh[n, j] = (d_xw[t] @ U.T)[n, j], per-gate dropout masks applied, for live rows.

    Register tiles of `_ROWS` rows times 4 units. With `dropout` (a
    compile-time constant), each gate's partial sums are weighted by its
    dropout mask (a lane's share, before the lanes are added).
    """
    N, H = dh.shape
    dz = d_xw[t]
    acc = cuda.local.array(_ACC, float32)
    total = cuda.local.array(_ACC, float32)
    lane = cuda.threadIdx.x % lanes
    group = cuda.threadIdx.x // lanes
    row_tiles = (N + _ROWS - 1) // _ROWS
    unit_tiles = (width + 3) // 4
    tiles_per_round, units_per_round = _round_shape(cuda.blockDim.x // lanes, unit_tiles,
                                                    row_tiles)
    my_tile = group // units_per_round
    masked = mask.shape[0] > 0
    for tile0 in range(0, row_tiles, tiles_per_round):
        n_first = tile0 * _ROWS
        n0 = n_first + my_tile * _ROWS
        for unit0 in range(0, unit_tiles, units_per_round):
            jj0 = 4 * (unit0 + group % units_per_round)
            active = my_tile < tiles_per_round and n0 < N and jj0 < width
            rows = (min(jj0, width - 1), min(jj0 + 1, width - 1), min(jj0 + 2, width - 1),
                    min(jj0 + 3, width - 1))
            for a in range(_ACC):
                acc[a] = _ZERO
                if dropout:
                    total[a] = _ZERO
            s0 = _WEIGHT_FLOATS + my_tile * _ROWS * _CHUNK
            for g in range(4):
                if dropout:
                    for a in range(_ACC):
                        acc[a] = _ZERO
                for k0 in range(0, H, _CHUNK):
                    chunk = min(_CHUNK, H - k0)
                    col0 = g * H + k0
                    cuda.syncthreads()
                    _stage_rows(cache, dz, n_first, tiles_per_round * _ROWS, col0, chunk)
                    cuda.syncthreads()
                    if active:
                        on_chip = min(chunk, max(0, cached_c - col0))
                        _tile_products(acc, cache, s0, cache, rows[0] * cached_c + col0,
                                       rows[1] * cached_c + col0, rows[2] * cached_c + col0,
                                       rows[3] * cached_c + col0, lane, on_chip, lanes)
                        u0 = (first + rows[0]) * 4 * H + col0
                        _tile_products(acc, cache, s0, u_flat, u0,
                                       u0 + (rows[1] - rows[0]) * 4 * H,
                                       u0 + (rows[2] - rows[0]) * 4 * H,
                                       u0 + (rows[3] - rows[0]) * 4 * H,
                                       on_chip + lane, chunk, lanes)
                if dropout and active:
                    for r in range(_ROWS):
                        _fold_gate(total, acc, r, recurrent_mask, g, min(n0 + r, N - 1),
                                   first, rows)
            if dropout:
                _group_sum(total, lanes)
                _share_sums(cache, total, lane, group)
            else:
                _group_sum(acc, lanes)
                _share_sums(cache, acc, lane, group)
            if active:
                for a in range(lane, _ACC, lanes):
                    n = n0 + a // 4
                    jj = jj0 + a % 4
                    if n < N and jj < width and (not masked or mask[t, n]):
                        dh[n, first + jj] = cache[_WEIGHT_FLOATS + group * _ACC + a]


# ---------------------------------------------------------------------------
# Kernels, compiled once per activation pair.


def _make_kernels(activation, recurrent_activation, lanes, dropout):
    """The forward and backward kernels specialized for one activation pair.

    The activation codes, `lanes` (threads per register-tile group, a power
    of two up to 32) and `dropout` (whether a recurrent dropout mask applies)
    are closure constants, so the gate math is compiled for the pair alone,
    the inner loops' strides are known and kernels without dropout carry no
    dropout code.
    Every kernel takes `(units, weight_floats)` first: hidden units per block
    and shared-memory floats used to cache weights (at most `_WEIGHT_FLOATS`).
    """
    act, ract = activation, recurrent_activation

    @_kernel
    def lstm_forward_persistent(units, weight_floats, xw, u, u_t, h0, c0, mask,
                                recurrent_mask, zero_output_for_mask, outputs, h_n, c_n, h_seq,
                                c_seq, gates, h_buf):
        """Runs the LSTM recurrence over all timesteps in one cooperative launch.

        Launch `ceil(H / units)` blocks of a multiple of `lanes` threads, at
        most `max_cooperative_grid_blocks`.

        Args:
            u: [H, 4H] `recurrent_kernel`.
            u_t: [4H * H] scratch: the streamed weights, transposed.
            h_buf: [2, N, H] scratch: the hidden state, double-buffered.
            Others: as for `kernels.cpu.lstm_forward`.
        """
        grid = cuda.cg.this_grid()
        cache = cuda.shared.array(_SHARED_FLOATS, float32)
        H = h0.shape[1]
        first, width = _block_slice(H, units)
        cached_k = min(H, weight_floats // (4 * units))
        _forward_weights(u, u_t, cache, cached_k, first, width)
        _forward_initial_states(first, width, h0, c0, h_buf[0], c_n, h_seq, c_seq)
        grid.sync()
        T = outputs.shape[0]
        for t in range(T):
            _forward_step(t, xw, u_t, cache, cached_k, first, width, lanes, h_buf[t % 2],
                          h_buf[(t + 1) % 2], c_n, c_n, mask, recurrent_mask, dropout, act, ract,
                          zero_output_for_mask, outputs, h_seq, c_seq, gates)
            grid.sync()
        _copy_units(h_buf[T % 2], h_n, first, width)

    @_kernel
    def lstm_forward_block(units, weight_floats, xw, u, u_t, h0, c0, mask,
                           recurrent_mask, zero_output_for_mask, outputs, h_n, c_n, h_seq, c_seq,
                           gates, h_buf):
        """`lstm_forward_persistent` for a one-block launch (`units >= H`), no grid barrier."""
        cache = cuda.shared.array(_SHARED_FLOATS, float32)
        H = h0.shape[1]
        first, width = _block_slice(H, units)
        cached_k = min(H, weight_floats // (4 * units))
        _forward_weights(u, u_t, cache, cached_k, first, width)
        _forward_initial_states(first, width, h0, c0, h_buf[0], c_n, h_seq, c_seq)
        cuda.syncthreads()
        T = outputs.shape[0]
        for t in range(T):
            _forward_step(t, xw, u_t, cache, cached_k, first, width, lanes, h_buf[t % 2],
                          h_buf[(t + 1) % 2], c_n, c_n, mask, recurrent_mask, dropout, act, ract,
                          zero_output_for_mask, outputs, h_seq, c_seq, gates)
            cuda.syncthreads()
        _copy_units(h_buf[T % 2], h_n, first, width)

    @_kernel
    def lstm_forward_step(t, units, weight_floats, xw, u, u_t, h0, c0, mask,
                          recurrent_mask, zero_output_for_mask, outputs, h_n, c_n, h_seq, c_seq,
                          gates, h_buf):
        """Step `t` of `lstm_forward_persistent` over any grid: launch once per step."""
        cache = cuda.shared.array(_SHARED_FLOATS, float32)
        H = h0.shape[1]
        first, width = _block_slice(H, units)
        cached_k = min(H, weight_floats // (4 * units))
        _forward_weights(u, u_t, cache, cached_k, first, width)
        h = h_buf[t % 2]
        c_prev = c_n
        if t == 0:
            h = h0
            c_prev = c0
            if h_seq.shape[0] > 0:
                _forward_initial_states(first, width, h0, c0, h_seq[0], c_seq[0], h_seq, c_seq)
        cuda.syncthreads()
        _forward_step(t, xw, u_t, cache, cached_k, first, width, lanes, h, h_buf[(t + 1) % 2],
                      c_prev, c_n, mask, recurrent_mask, dropout, act, ract, zero_output_for_mask,
                      outputs, h_seq, c_seq, gates)
        if t == outputs.shape[0] - 1:
            cuda.syncthreads()
            _copy_units(h_buf[(t + 1) % 2], h_n, first, width)

    @_kernel
    def lstm_backward_persistent(units, weight_floats, u, u_flat, mask, recurrent_mask,
                                 zero_output_for_mask, c_seq, gates, d_outputs, d_h_n, d_c_n,
                                 d_xw, d_h0, d_c0, carried):
        """Backpropagates through the recurrence (BPTT) in one cooperative launch.

        Launch as `lstm_forward_persistent`.

        Args:
            u: [H, 4H] `recurrent_kernel`; u_flat: the same memory, flat.
            mask, recurrent_mask, zero_output_for_mask: as for the forward.
            c_seq: [T+1, N, H] and gates: [T, N, 4H], saved by the forward.
            d_outputs: [T, N, H] gradient of the outputs.
            d_h_n, d_c_n: [N, H] gradients of the final states.
            d_xw: [T, N, 4H] gradient of the input projection, written.
            d_h0, d_c0: [N, H] gradients of the initial states, written (they
                hold the running dh and dc during the pass).
            carried: [N, H] scratch: output gradient carried through masked
                steps.
        """
        grid = cuda.cg.this_grid()
        cache = cuda.shared.array(_SHARED_FLOATS, float32)
        H = u.shape[0]
        first, width = _block_slice(H, units)
        cached_c = min(4 * H, weight_floats // units)
        _backward_weights(u, cache, cached_c, first, width)
        _backward_initial_states(first, width, d_h_n, d_c_n, d_h0, d_c0, carried)
        cuda.syncthreads()
        for t in range(d_outputs.shape[0] - 1, -1, -1):
            _backward_cells(t, first, width, mask, act, ract, zero_output_for_mask, c_seq,
                            gates, d_outputs, d_xw, d_h0, d_c0, carried)
            grid.sync()
            _backward_products(t, u_flat, cache, cached_c, first, width, lanes, mask,
                               recurrent_mask, dropout, d_xw, d_h0)
            cuda.syncthreads()

    @_kernel
    def lstm_backward_block(units, weight_floats, u, u_flat, mask, recurrent_mask,
                            zero_output_for_mask, c_seq, gates, d_outputs, d_h_n, d_c_n, d_xw,
                            d_h0, d_c0, carried):
        """`lstm_backward_persistent` for a one-block launch (`units >= H`), no grid barrier."""
        cache = cuda.shared.array(_SHARED_FLOATS, float32)
        H = u.shape[0]
        first, width = _block_slice(H, units)
        cached_c = min(4 * H, weight_floats // units)
        _backward_weights(u, cache, cached_c, first, width)
        _backward_initial_states(first, width, d_h_n, d_c_n, d_h0, d_c0, carried)
        cuda.syncthreads()
        for t in range(d_outputs.shape[0] - 1, -1, -1):
            _backward_cells(t, first, width, mask, act, ract, zero_output_for_mask, c_seq,
                            gates, d_outputs, d_xw, d_h0, d_c0, carried)
            cuda.syncthreads()
            _backward_products(t, u_flat, cache, cached_c, first, width, lanes, mask,
                               recurrent_mask, dropout, d_xw, d_h0)
            cuda.syncthreads()

    @_kernel
    def lstm_backward_step(t, units, weight_floats, u, u_flat, mask, recurrent_mask,
                           zero_output_for_mask, c_seq, gates, d_outputs, d_h_n, d_c_n, d_xw,
                           d_h0, d_c0, carried):
        """The recurrent product of step t + 1, then the cells of step t, over any grid.

        Launch for t = T - 1 down to -1 (the last launch only finishes step 0).
        """
        cache = cuda.shared.array(_SHARED_FLOATS, float32)
        H = u.shape[0]
        T = d_outputs.shape[0]
        first, width = _block_slice(H, units)
        cached_c = min(4 * H, weight_floats // units)
        _backward_weights(u, cache, cached_c, first, width)
        if t == T - 1:
            _backward_initial_states(first, width, d_h_n, d_c_n, d_h0, d_c0, carried)
        cuda.syncthreads()
        if t + 1 < T:
            _backward_products(t + 1, u_flat, cache, cached_c, first, width, lanes, mask,
                               recurrent_mask, dropout, d_xw, d_h0)
            cuda.syncthreads()
        if t >= 0:
            _backward_cells(t, first, width, mask, act, ract, zero_output_for_mask, c_seq,
                            gates, d_outputs, d_xw, d_h0, d_c0, carried)

    return pytypes.SimpleNamespace(
        lstm_forward_persistent=lstm_forward_persistent, lstm_forward_block=lstm_forward_block,
        lstm_forward_step=lstm_forward_step, lstm_backward_persistent=lstm_backward_persistent,
        lstm_backward_block=lstm_backward_block, lstm_backward_step=lstm_backward_step)


@functools.lru_cache(maxsize=None)
def kernels_for(activation, recurrent_activation, lanes=32, dropout=False):
    """The kernels for one pair of codes from `gates.ACTIVATION_CODES`, one
    `lanes` and with or without recurrent dropout; they compile on first
    launch."""
    codes = set(ACTIVATION_CODES.values())
    if activation not in codes or recurrent_activation not in codes:
        raise ValueError(f"activation codes must be among {sorted(codes)}; received "
                         f"{activation!r} and {recurrent_activation!r}.")
    return _make_kernels(activation, recurrent_activation, lanes, bool(dropout))


@_kernel
def swap_leading_axes(src, dst):
    """dst[b, a, k] = src[a, b, k]: the drivers' batch-major [N, T, K] arrays to the
    kernels' time-major [T, N, K] ones and back. Blocks stride over the rows (a, b),
    threads over k: one division per row, coalesced loads and stores."""
    A, B, K = src.shape
    for row in range(cuda.blockIdx.x, A * B, cuda.gridDim.x):
        a = row // B
        b = row - a * B
        for k in range(cuda.threadIdx.x, K, cuda.blockDim.x):
            dst[b, a, k] = src[a, b, k]


# ---------------------------------------------------------------------------
# Kernel signatures: what the host drivers launch, for offline compilation.


def _array(ndim, dtype=types.float32):
    return types.Array(dtype, ndim, "C")


_I64, _BOOL = types.int64, types.boolean
_LAUNCH_TYPES = (_I64, _I64)  # units, weight_floats
_FORWARD_SIGNATURE = _LAUNCH_TYPES + (
    _array(3), _array(2), _array(1), _array(2), _array(2), _array(2, _BOOL), _array(3), _BOOL,
    _array(3), _array(2), _array(2), _array(3), _array(3), _array(3), _array(3))
_BACKWARD_SIGNATURE = _LAUNCH_TYPES + (
    _array(2), _array(1), _array(2, _BOOL), _array(3), _BOOL, _array(3), _array(3), _array(3),
    _array(2), _array(2), _array(3), _array(2), _array(2), _array(2))

# Kernel name -> the Numba signatures the host drivers launch it with (the
# kernels of `kernels_for(TANH, SIGMOID)`: the stock Keras activations, 32
# lanes, the drivers' default; `_dropout` names the recurrent-dropout build).
_DROPOUT = "_dropout"
SIGNATURES = {
    "lstm_forward_persistent": (_FORWARD_SIGNATURE,),
    "lstm_forward_persistent" + _DROPOUT: (_FORWARD_SIGNATURE,),
    "lstm_forward_block": (_FORWARD_SIGNATURE,),
    "lstm_forward_step": ((_I64,) + _FORWARD_SIGNATURE,),
    "lstm_backward_persistent": (_BACKWARD_SIGNATURE,),
    "lstm_backward_persistent" + _DROPOUT: (_BACKWARD_SIGNATURE,),
    "lstm_backward_block": (_BACKWARD_SIGNATURE,),
    "lstm_backward_step": ((_I64,) + _BACKWARD_SIGNATURE,),
    "swap_leading_axes": ((_array(3), _array(3)), (_array(3, _BOOL), _array(3, _BOOL))),
}


def kernel_by_name(name, activation=TANH, recurrent_activation=SIGMOID):
    """The kernel called `name` in `SIGNATURES`, for one activation pair."""
    if name not in SIGNATURES:
        raise ValueError(f"name must be one of {sorted(SIGNATURES)}; received {name!r}.")
    if name == "swap_leading_axes":
        return swap_leading_axes
    dropout = name.endswith(_DROPOUT)
    kernels = kernels_for(activation, recurrent_activation, dropout=dropout)
    return getattr(kernels, name[:-len(_DROPOUT)] if dropout else name)


# ---------------------------------------------------------------------------
# Host drivers.

def forward(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, activation,
            recurrent_activation, zero_output_for_mask, training, *, stream=None,
            block_size=256, lanes=32, units_per_block=None, cache_floats=None,
            single_block=None, step_launches=False):
    """Host driver for the forward kernels, batch-major as `kernels.cpu.forward`.

    The kernels run time-major: the driver swaps the leading axes of its
    sequence inputs and results on the way in and out (`swap_leading_axes`).

    Args:
        xw: [N, T, 4H] float32 input projection, bias included.
        recurrent_kernel: [H, 4H]; h0, c0: [N, H].
        mask: [N, T] bool or None; recurrent_mask: [4, N, H] or None.
        activation, recurrent_activation: codes from `gates.ACTIVATION_CODES`.
        zero_output_for_mask: masked steps output zeros instead of the last
            unmasked output.
        training: save what `backward` needs.
        stream: a Numba stream, an integer CUDA stream handle (for example
            `torch.cuda.current_stream().cuda_stream`), or None for the
            default stream. Device inputs must be ready in this stream's
            order (produced on it, or synchronized by the caller): the
            driver does not wait on the stream named by their
            `__cuda_array_interface__`.
        block_size: threads per block, at most 256 (the kernels' launch
            bounds) and a multiple of 32 on a GPU.
        lanes: threads that share one register tile's dot products, a
            power of two up to 32.
        units_per_block: hidden units per block; None picks a slice that
            keeps the weights on chip and spreads over the SMs.
        cache_floats: shared-memory floats used to cache weights, at most
            `_WEIGHT_FLOATS` (the default); smaller values stream more
            weights through L2.
        single_block: True runs one block (no cooperative launch), False a
            cooperative grid, None picks by problem size.
        step_launches: True runs one launch per timestep over
            `ceil(H / units_per_block)` blocks (no grid barrier, no limit on
            the grid): slower, but it runs multi-block in the CUDA simulator.

    Returns:
        `(outputs [N, T, H], h_n, c_n, saved)`, with `saved = (h_in [N, T, H],
        c_seq [N, T+1, H], gates [N, T, 4H])` when training, else None. NumPy
        arrays when `xw` is a NumPy array, otherwise Numba device arrays
        written on `stream`.
    """
    cache_floats = _check_launch_options(block_size, lanes, units_per_block, cache_floats)
    stream = _as_stream(stream)
    on_host = not _is_device_array(xw)
    N, T, H = _sequence_shape(xw, "xw", 4)
    f32 = np.float32
    xw = _time_major(xw, "xw", (N, T, 4 * H), f32, stream)
    recurrent_kernel = _to_device(recurrent_kernel, "recurrent_kernel", (H, 4 * H), f32, stream)
    h0 = _to_device(h0, "h0", (N, H), f32, stream)
    c0 = _to_device(c0, "c0", (N, H), f32, stream)
    mask = _mask_or_empty(mask, N, T, stream)
    recurrent_mask = _recurrent_mask_or_empty(recurrent_mask, N, H, stream)
    kernels = kernels_for(int(activation), int(recurrent_activation), lanes,
                          recurrent_mask.shape[0] > 0)
    outputs = cuda.device_array((T, N, H), f32, stream=stream)
    h_n = cuda.device_array((N, H), f32, stream=stream)
    c_n = cuda.device_array((N, H), f32, stream=stream)
    h_seq = cuda.device_array((T + 1 if training else 0, N, H), f32, stream=stream)
    c_seq = cuda.device_array((T + 1 if training else 0, N, H), f32, stream=stream)
    gates = cuda.device_array((T if training else 0, N, 4 * H), f32, stream=stream)
    h_buf = _scratch("h_buf", (2, N, H), f32, stream)
    u_t = _scratch("u_t", (4 * H * H,), f32, stream)
    _launch((kernels.lstm_forward_block, kernels.lstm_forward_persistent,
             kernels.lstm_forward_step),
            (xw, recurrent_kernel, u_t, h0, c0, mask, recurrent_mask, bool(zero_output_for_mask),
             outputs, h_n, c_n, h_seq, c_seq, gates, h_buf),
            range(T), N, H, stream, block_size, units_per_block, cache_floats, single_block,
            step_launches)
    results = (_swap_leading(outputs, stream), h_n, c_n, _swap_leading(h_seq[:T], stream),
               _swap_leading(c_seq, stream), _swap_leading(gates, stream))
    if on_host:
        results = _to_host(results, stream)
    outputs, h_n, c_n, h_in, c_seq, gates = results
    saved = (h_in, c_seq, gates) if training else None
    return outputs, h_n, c_n, saved


def backward(recurrent_kernel, mask, recurrent_mask, activation, recurrent_activation,
             zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n, *, stream=None,
             block_size=256, lanes=32, units_per_block=None, cache_floats=None,
             single_block=None, step_launches=False):
    """Host driver for the backward kernels, batch-major as `kernels.cpu.backward`.

    Args:
        recurrent_kernel, mask, recurrent_mask, activation,
        recurrent_activation, zero_output_for_mask: as for `forward`.
        saved: `(h_in, c_seq, gates)` from `forward(..., training=True)`.
        d_outputs: [N, T, H] gradient of the outputs.
        d_h_n, d_c_n: [N, H] gradients of the final states.
        stream, block_size, lanes, units_per_block, cache_floats,
        single_block, step_launches: as for `forward`.

    Returns:
        `(d_xw [N, T, 4H], d_h0, d_c0)`: NumPy arrays when `d_outputs` is a
        NumPy array, otherwise Numba device arrays written on `stream`.
    """
    if saved is None or len(saved) != 3:
        raise ValueError("saved must be the (h_in, c_seq, gates) returned by "
                         f"forward(..., training=True); received {saved!r}.")
    cache_floats = _check_launch_options(block_size, lanes, units_per_block, cache_floats)
    stream = _as_stream(stream)
    on_host = not _is_device_array(d_outputs)
    N, T, H = _sequence_shape(d_outputs, "d_outputs", 1)
    f32 = np.float32
    _, c_seq, gates = saved
    recurrent_kernel = _to_device(recurrent_kernel, "recurrent_kernel", (H, 4 * H), f32, stream)
    mask = _mask_or_empty(mask, N, T, stream)
    recurrent_mask = _recurrent_mask_or_empty(recurrent_mask, N, H, stream)
    c_seq = _time_major(c_seq, "c_seq", (N, T + 1, H), f32, stream)
    gates = _time_major(gates, "gates", (N, T, 4 * H), f32, stream)
    d_outputs = _time_major(d_outputs, "d_outputs", (N, T, H), f32, stream)
    d_h_n = _to_device(d_h_n, "d_h_n", (N, H), f32, stream)
    d_c_n = _to_device(d_c_n, "d_c_n", (N, H), f32, stream)
    d_xw = cuda.device_array((T, N, 4 * H), f32, stream=stream)
    d_h0 = cuda.device_array((N, H), f32, stream=stream)
    d_c0 = cuda.device_array((N, H), f32, stream=stream)
    carried = _scratch("carried", (N, H), f32, stream)
    kernels = kernels_for(int(activation), int(recurrent_activation), lanes,
                          recurrent_mask.shape[0] > 0)
    _launch((kernels.lstm_backward_block, kernels.lstm_backward_persistent,
             kernels.lstm_backward_step),
            (recurrent_kernel, recurrent_kernel.reshape(4 * H * H), mask, recurrent_mask,
             bool(zero_output_for_mask), c_seq, gates, d_outputs, d_h_n, d_c_n, d_xw, d_h0, d_c0,
             carried),
            range(T - 1, -2, -1), N, H, stream, block_size, units_per_block, cache_floats,
            single_block, step_launches)
    results = (_swap_leading(d_xw, stream), d_h0, d_c0)
    return _to_host(results, stream) if on_host else results


def _launch(kernels, data_args, steps, N, H, stream, block_size, units_per_block,
            cache_floats, single_block, step_launches):
    """Picks the kernel and its grid, checks that the grid fits, and launches.

    Args:
        kernels: `(one_block_kernel, cooperative_kernel, step_kernel)`; the
            first two take `(units, cache_floats, *data_args)`, the
            step kernel takes the step first.
        steps: the values of t the step kernel is launched with, in order.
    """
    if step_launches:
        units = units_per_block or max(1, min(H, cache_floats // (4 * H)))
        blocks = -(-H // units)
        for t in steps:
            kernels[2][blocks, block_size, stream](t, units, cache_floats, *data_args)
        return
    if single_block is None:
        single_block = 4 * H * H <= cache_floats and N * 4 * H * H <= _SINGLE_BLOCK_WORK
    if single_block:
        if units_per_block is not None and units_per_block < H:
            raise ValueError(f"single_block=True needs units_per_block >= H={H}; "
                             f"received units_per_block={units_per_block}.")
        kernel, units, blocks = kernels[0], H, 1
    else:
        kernel = kernels[1]
        limit = _max_cooperative_blocks(kernel, (1, cache_floats) + data_args, block_size)
        units, blocks = _grid_shape(H, units_per_block, limit, cache_floats, block_size)
    kernel[blocks, block_size, stream](units, cache_floats, *data_args)


def _grid_shape(H, units_per_block, max_blocks, cache_floats, block_size):
    """`(units, blocks)`: units per block and the cooperative grid size."""
    if units_per_block is None:
        # Widest slice that keeps at least 90% of its weights on chip.
        fit = max(1, cache_floats * 10 // (36 * H))
        spread = -(-H // _multiprocessor_count())  # one block per SM
        units = max(min(fit, spread), -(-H // max_blocks))
    else:
        units = units_per_block
    blocks = -(-H // units)
    if blocks > max_blocks:
        raise ValueError(
            f"units_per_block={units} needs {blocks} blocks for H={H}, but a cooperative "
            f"launch of {block_size}-thread blocks fits at most {max_blocks} on this device.")
    return units, blocks


def _max_cooperative_blocks(kernel, args, block_size):
    if _SIMULATED:
        # The simulator runs blocks one after another: one block at most.
        overload = kernel.overloads[None]
    else:
        overload = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
    return overload.max_cooperative_grid_blocks(block_size)


def _multiprocessor_count():
    return getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 1)


def _check_launch_options(block_size, lanes, units_per_block, cache_floats):
    """Validates the drivers' launch options; returns `cache_floats` with its default."""
    if lanes not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"lanes must be a power of two from 1 to 32; received {lanes}.")
    if not 1 <= block_size <= _MAX_THREADS or block_size % lanes:
        raise ValueError(f"block_size must be a multiple of lanes={lanes} between 1 and "
                         f"{_MAX_THREADS}; received {block_size}.")
    if not _SIMULATED and block_size % 32:
        raise ValueError("block_size must be a multiple of 32 (warp shuffles need whole "
                         f"warps); received {block_size}.")
    if units_per_block is not None and units_per_block < 1:
        raise ValueError(f"units_per_block must be >= 1; received {units_per_block}.")
    if cache_floats is None:
        return _WEIGHT_FLOATS
    if not 0 <= cache_floats <= _WEIGHT_FLOATS:
        raise ValueError(f"cache_floats must be between 0 and {_WEIGHT_FLOATS}; "
                         f"received {cache_floats}.")
    return int(cache_floats)


def _scratch(name, shape, dtype, stream):
    """A device buffer kept per device, stream and name, reused while its shape fits.

    Calls on one stream run in order, so a buffer never serves two kernels at
    once; calls on other streams get their own.
    """
    key = (_device_id(), _stream_key(stream), name)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
        buffer = _SCRATCH[key] = cuda.device_array(shape, dtype, stream=stream)
    return buffer


_SCRATCH = {}


def _device_id():
    return 0 if _SIMULATED else cuda.get_current_device().id


def _stream_key(stream):
    handle = getattr(stream, "handle", None)
    return int(getattr(handle, "value", handle) or 0)


def _as_stream(stream):
    if stream is None or (isinstance(stream, int) and stream == 0):
        return cuda.default_stream()
    if isinstance(stream, int):
        return cuda.external_stream(stream)
    return stream


def _sequence_shape(array, name, gate_factor):
    """`(N, T, H)` of a batch-major [N, T, gate_factor * H] array."""
    shape = tuple(array.shape)
    if len(shape) != 3 or shape[2] % gate_factor or shape[2] == 0:
        expected = "[N, T, 4H]" if gate_factor == 4 else "[N, T, H]"
        raise ValueError(
            f"{name} must have shape {expected} with H >= 1; received {list(shape)}.")
    return shape[0], shape[1], shape[2] // gate_factor


def _is_device_array(array):
    if cuda.devicearray.is_cuda_ndarray(array) or hasattr(array, "__cuda_array_interface__"):
        return True
    if isinstance(array, StridedMemoryView):
        return bool(array.is_device_accessible)
    dlpack_device = getattr(array, "__dlpack_device__", None)
    return dlpack_device is not None and dlpack_device()[0] in _DLPACK_CUDA_DEVICES


def _device_view(array):
    """A Numba device array over the memory of any supported device array."""
    if cuda.devicearray.is_cuda_ndarray(array):
        return array
    if hasattr(array, "__cuda_array_interface__"):
        return cuda.as_cuda_array(array, sync=False)
    view = array if isinstance(array, StridedMemoryView) else StridedMemoryView.from_dlpack(
        array, stream_ptr=None)
    itemsize = np.dtype(view.dtype).itemsize
    strides = None if view.strides is None else tuple(s * itemsize for s in view.strides)
    interface = {"shape": tuple(view.shape), "strides": strides,
                 "typestr": np.dtype(view.dtype).str, "data": (view.ptr, view.readonly),
                 "version": 3}
    return cuda.from_cuda_array_interface(interface, owner=view, sync=False)


def _to_device(array, name, shape, dtype, stream):
    """Validates `array` and returns it as a C-contiguous device array.

    NumPy (or array-like) inputs are cast and copied; device inputs are used in
    place and must already have the right dtype and layout.
    """
    if _is_device_array(array):
        array = _device_view(array)
        if array.dtype != dtype:
            raise ValueError(f"{name} must be {np.dtype(dtype).name} on the device; "
                             f"received {array.dtype}.")
        if not array.is_c_contiguous():
            raise ValueError(f"{name} must be C-contiguous on the device; received strides "
                             f"{array.strides} for shape {array.shape}.")
    else:
        array = np.ascontiguousarray(array, dtype)
    if tuple(array.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}; received {list(array.shape)}.")
    if isinstance(array, np.ndarray):
        array = cuda.to_device(array, stream=stream)
    return array


def _mask_or_empty(mask, N, T, stream):
    """The [N, T] mask, time-major [T, N] on the device, or an empty [0, N]."""
    if mask is None:
        return _scratch("no_mask", (0, N), np.bool_, stream)
    return _time_major(mask, "mask", (N, T), np.bool_, stream)


def _time_major(array, name, shape, dtype, stream):
    """A batch-major [N, T, ...] input, validated, as a time-major [T, N, ...] device array."""
    if _is_device_array(array):
        return _swap_leading(_to_device(array, name, shape, dtype, stream), stream)
    array = np.asarray(array, dtype)
    if tuple(array.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}; received {list(array.shape)}.")
    swapped = (shape[1], shape[0]) + tuple(shape[2:])
    return _to_device(np.swapaxes(array, 0, 1), name, swapped, dtype, stream)


def _swap_leading(array, stream):
    """[A, B, ...] -> [B, A, ...] on the device, through `swap_leading_axes`."""
    A, B = array.shape[:2]
    rest = tuple(array.shape[2:])
    K = int(np.prod(rest, dtype=np.int64))
    swapped = cuda.device_array((B, A) + rest, array.dtype, stream=stream)
    if A * B * K:
        blocks = min(_SWAP_MAX_BLOCKS, A * B)
        swap_leading_axes[blocks, _SWAP_THREADS, stream](array.reshape(A, B, K),
                                                         swapped.reshape(B, A, K))
    return swapped


def _recurrent_mask_or_empty(recurrent_mask, N, H, stream):
    if recurrent_mask is None:
        return _scratch("no_recurrent_mask", (0, N, H), np.float32, stream)
    return _to_device(recurrent_mask, "recurrent_mask", (4, N, H), np.float32, stream)


def _to_host(arrays, stream):
    host = tuple(a.copy_to_host(stream=stream) for a in arrays)
    stream.synchronize()
    return host
