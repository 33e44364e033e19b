"""Device math of the CUDA kernels: the `cuda.jit(device=True)` functions they are built from.

Shared-memory layout, register tiles, staging of rows, the forward and
backward steps of one block's units, and the prologues and barrier that every
kernel of `factory` starts with. The gate math itself is `kernels.gates`,
compiled here for the device. See the package docstring for the design.
"""

import numpy as np
from numba import config, cuda, float32, uint64

from ..gates import compile_gates

_gates = compile_gates(cuda.jit(device=True, inline="always"))
_cell_forward = _gates.cell_forward
_cell_backward = _gates.cell_backward

# Static shared memory per block is capped at 48 KB (numba-cuda declares no
# more); 1 KB of headroom stays below the cap. The first `WEIGHT_FLOATS`
# cache weights, the rest stages `_STAGE_ROWS` rows of `_CHUNK` columns.
SHARED_FLOATS = 12 * 1024 - 256
_CHUNK = 128
_STAGE_ROWS = 32
WEIGHT_FLOATS = SHARED_FLOATS - _STAGE_ROWS * _CHUNK
# Batch rows per register tile; a tile holds _ROWS x 4 sums.
_ROWS = 4
_ACC = 4 * _ROWS
_STAGE_TILES = _STAGE_ROWS // _ROWS
_FULL_WARP = 0xFFFFFFFF
# Threads per block at most: the kernels' launch bounds (`launch.LAUNCH_BOUNDS`).
MAX_THREADS = 256
_ZERO = np.float32(0.0)
_U_CHUNK = np.uint64(_CHUNK)
_U_WEIGHT_FLOATS = np.uint64(WEIGHT_FLOATS)
_U0 = np.uint64(0)
_U1 = np.uint64(1)
_U2 = np.uint64(2)
_U3 = np.uint64(3)
_U4 = np.uint64(4)
SIMULATED = bool(config.ENABLE_CUDASIM)
device = cuda.jit(device=True, inline="always")


# ---------------------------------------------------------------------------
# Prologues and the barrier: what every kernel starts with.


@device
def forward_prologue(units, weight_floats, u, u_t, cache):
    """The block's units and its weight cache, filled, for the forward kernels.

    Returns:
        `(first, width, cached_k)`: the block's first unit, its number of
        units, and the rows of `U` cached per column (`_forward_weights`).
    """
    H = u.shape[0]
    first, width = block_slice(H, units)
    cached_k = min(H, weight_floats // (4 * units))
    _forward_weights(u, u_t, cache, cached_k, first, width)
    return first, width, cached_k


@device
def backward_prologue(units, weight_floats, u, cache):
    """`forward_prologue` for the backward kernels: `(first, width, cached_c)`."""
    H = u.shape[0]
    first, width = block_slice(H, units)
    cached_c = min(4 * H, weight_floats // units)
    _backward_weights(u, cache, cached_c, first, width)
    return first, width, cached_c


@device
def barrier(cooperative):
    """A grid barrier when `cooperative` (a compile-time constant), else a block barrier.

    With a constant False the grid barrier is pruned, so the kernel needs no
    cooperative launch.
    """
    if cooperative:
        cuda.cg.this_grid().sync()
    else:
        cuda.syncthreads()


# ---------------------------------------------------------------------------
# Device functions shared by all kernels.


@device
def block_slice(H, units):
    """First unit and number of units owned by this block."""
    first = cuda.blockIdx.x * units
    return first, max(0, min(units, H - first))


@device
def _group_sum_shuffled(acc, lanes):
    """Gives every lane of a group of `lanes` threads the group's sums of `acc`."""
    offset = lanes // 2
    while offset > 0:
        for a in range(_ACC):
            acc[a] += cuda.shfl_xor_sync(_FULL_WARP, acc[a], offset)
        offset //= 2


@device
def _group_sum_simulated(acc, lanes):
    """`_group_sum_shuffled` for the CUDA simulator, which has no shuffles."""
    partials = cuda.shared.array((MAX_THREADS, _ACC), float32)
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


_group_sum = _group_sum_simulated if SIMULATED else _group_sum_shuffled


@device
def _tile_fma(acc, stage, s, weights, w0, w1, w2, w3):
    """acc[4r + q] += stage[s + r * _CHUNK] * weights[w_q] for r < _ROWS, q < 4."""
    u0, u1, u2, u3 = weights[w0], weights[w1], weights[w2], weights[w3]
    for r in range(_ROWS):
        x = stage[s + uint64(r) * _U_CHUNK]
        acc[4 * r] += x * u0
        acc[4 * r + 1] += x * u1
        acc[4 * r + 2] += x * u2
        acc[4 * r + 3] += x * u3


@device
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


@device
def _share_sums(cache, acc, lane, group):
    """Copies each group's sums to its slot of the stage area, for all its lanes.

    The lanes then read the sums they need with a runtime index from shared
    memory (a runtime index into `acc` would put it in local memory).
    """
    cuda.syncthreads()
    if lane == 0:
        for a in range(_ACC):
            cache[WEIGHT_FLOATS + group * _ACC + a] = acc[a]
    cuda.syncthreads()


@device
def _stage_rows(stage, src, n_first, rows, c0, width, recurrent_mask, gate, dropout):
    """stage[WEIGHT_FLOATS + r * _CHUNK + kk] = src[n_first + r, c0 + kk].

    With `dropout` (a compile-time constant), times `recurrent_mask[gate, n_first + r,
    c0 + kk]`: the staged rows are the masked hidden state of one gate.
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
            n = min(n_first + r, last)
            value = src[n, c0 + kk]
            if dropout:
                value *= recurrent_mask[uint64(gate), n, c0 + kk]
            stage[_U_WEIGHT_FLOATS + r * _U_CHUNK + kk] = value
            r += row_step
        kk += columns


@device
def _chunk_products(acc, cache, src, col0, K, n_first, staged_rows, s0, active, lane, lanes,
                    cached, cached_from, c0, c1, c2, c3, streamed, w0, w1, w2, w3,
                    recurrent_mask, gate, dropout):
    """acc += (rows of `src`, columns col0 + k for k < K) times 4 weight columns.

    The inner product of every kernel, `_CHUNK` columns at a time: the block
    stages the rows (masked for `gate` with `dropout`, see `_stage_rows`),
    then each active group runs `_tile_products` over the part of the chunk
    whose weights are cached (column q at `cache[c_q + k]`, for k <
    `cached - cached_from`) and over the rest, streamed (`streamed[w_q + k]`).
    Every thread of the block must call it (it holds block barriers).
    """
    for k0 in range(0, K, _CHUNK):
        chunk = min(_CHUNK, K - k0)
        cuda.syncthreads()
        _stage_rows(cache, src, n_first, staged_rows, col0 + k0, chunk, recurrent_mask, gate,
                    dropout)
        cuda.syncthreads()
        if active:
            on_chip = min(chunk, max(0, cached - cached_from - k0))
            _tile_products(acc, cache, s0, cache, c0 + k0, c1 + k0, c2 + k0, c3 + k0, lane,
                           on_chip, lanes)
            _tile_products(acc, cache, s0, streamed, w0 + k0, w1 + k0, w2 + k0, w3 + k0,
                           on_chip + lane, chunk, lanes)


@device
def _round_shape(groups, tiles, row_tiles):
    """Row tiles and column tiles per round of register tiles.

    A round gives each group one (row tile, column tile) item; all items of a
    round share the staged rows.
    """
    per_round_rows = max(1, min(groups // max(1, tiles), _STAGE_TILES, row_tiles))
    return per_round_rows, max(1, min(tiles, groups))


@device
def _tile_rounds(N, width, lanes, columns):
    """How a step's register tiles are dealt out: tiles of `_ROWS` rows times
    `columns` of the block's `width` units (1: a unit's four gates; 4: four
    units of one gate).

    Returns:
        `(lane, group, row_tiles, col_tiles, tiles_per_round, cols_per_round,
        my_tile)`: this thread's lane and group, the tile counts, a round's
        shape (`_round_shape`) and this group's row tile within a round.
    """
    lane = cuda.threadIdx.x % lanes
    group = cuda.threadIdx.x // lanes
    row_tiles = (N + _ROWS - 1) // _ROWS
    col_tiles = (width + columns - 1) // columns
    tiles_per_round, cols_per_round = _round_shape(cuda.blockDim.x // lanes, col_tiles,
                                                   row_tiles)
    return (lane, group, row_tiles, col_tiles, tiles_per_round, cols_per_round,
            group // cols_per_round)


@device
def _tile_origin(tile0, col0, group, my_tile, tiles_per_round, cols_per_round, N, width,
                 columns):
    """`(n_first, n0, jj0, active)` of this group's tile in the round at (tile0, col0):
    the round's first row, the tile's first row and unit, and whether it has work."""
    n_first = tile0 * _ROWS
    n0 = n_first + my_tile * _ROWS
    jj0 = columns * (col0 + group % cols_per_round)
    return n_first, n0, jj0, my_tile < tiles_per_round and n0 < N and jj0 < width


@device
def _tile_item(a, n0, jj0, N, width):
    """`(n, jj, live)` of sum `a` of a rows-by-4-units tile."""
    n = n0 + a // 4
    jj = jj0 + a % 4
    return n, jj, n < N and jj < width


@device
def copy_units(src, dst, first, width):
    """dst[:, first:first + width] = src[:, first:first + width]."""
    for idx in range(cuda.threadIdx.x, src.shape[0] * width, cuda.blockDim.x):
        n = idx // width
        j = first + idx - n * width
        dst[n, j] = src[n, j]


# ---------------------------------------------------------------------------
# Forward device functions.


@device
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


@device
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


@device
def forward_initial_states(first, width, h0, c0, h, c, h_seq, c_seq):
    for idx in range(cuda.threadIdx.x, h0.shape[0] * width, cuda.blockDim.x):
        n = idx // width
        j = first + idx - n * width
        h[n, j] = h0[n, j]
        c[n, j] = c0[n, j]
        if h_seq.shape[0] > 0:
            h_seq[0, n, j] = h0[n, j]
            c_seq[0, n, j] = c0[n, j]


@device
def forward_step(t, xw, u_t, cache, cached_k, first, width, lanes, h, h_next, c_prev, c,
                 mask, recurrent_mask, dropout, activation, recurrent_activation,
                 zero_output_for_mask, outputs, h_seq, c_seq, gates):
    """One timestep for the block's units: reads h and c_prev, writes h_next and c.

    `dropout` (a compile-time constant) says whether `recurrent_mask` applies
    (`_forward_dropout_step`). Without it a register tile is `_ROWS` rows
    times the four gates of one unit.
    """
    if dropout:
        _forward_dropout_step(t, xw, u_t, cache, cached_k, first, width, lanes, h, h_next,
                              c_prev, c, mask, recurrent_mask, activation,
                              recurrent_activation, zero_output_for_mask, outputs, h_seq,
                              c_seq, gates)
        return
    N, H = h.shape
    acc = cuda.local.array(_ACC, float32)
    lane, group, row_tiles, _, tiles_per_round, units_per_round, my_tile = _tile_rounds(
        N, width, lanes, 1)
    gate_stride = width * cached_k
    # Block-uniform trip counts: every thread reaches each barrier and shuffle.
    for tile0 in range(0, row_tiles, tiles_per_round):
        for unit0 in range(0, width, units_per_round):
            n_first, n0, jj, active = _tile_origin(tile0, unit0, group, my_tile,
                                                   tiles_per_round, units_per_round, N, width, 1)
            j = first + min(jj, width - 1)
            for a in range(_ACC):
                acc[a] = _ZERO
            s0 = WEIGHT_FLOATS + my_tile * _ROWS * _CHUNK
            jc = min(jj, width - 1) * cached_k
            jt = j * H
            _chunk_products(acc, cache, h, 0, H, n_first, tiles_per_round * _ROWS, s0, active,
                            lane, lanes, cached_k, 0, jc, jc + gate_stride, jc + 2 * gate_stride,
                            jc + 3 * gate_stride, u_t, jt, jt + H * H, jt + 2 * H * H,
                            jt + 3 * H * H, recurrent_mask, 0, False)
            _group_sum(acc, lanes)
            _share_sums(cache, acc, lane, group)
            if active:
                sums = WEIGHT_FLOATS + group * _ACC
                for r in range(lane, _ROWS, lanes):
                    if n0 + r < N:
                        z = sums + 4 * r
                        _forward_unit(t, n0 + r, j, cache[z], cache[z + 1], cache[z + 2],
                                      cache[z + 3], xw, mask, h, h_next, c_prev, c, activation,
                                      recurrent_activation, zero_output_for_mask, outputs, h_seq,
                                      c_seq, gates)


@device
def _forward_dropout_step(t, xw, u_t, cache, cached_k, first, width, lanes, h, h_next, c_prev,
                          c, mask, recurrent_mask, activation, recurrent_activation,
                          zero_output_for_mask, outputs, h_seq, c_seq, gates):
    """`forward_step` with recurrent dropout: each gate sees its own masked h.

    A register tile is `_ROWS` rows times 4 units of one gate, so the staged
    rows (`h` times that gate's mask) are shared by the tile's columns and the
    inner loop is `_tile_products`, as without dropout. The four gates run one
    after another; each adds its sums into `xw[t]` (the drivers' private
    time-major copy, each element read once afterwards, by the lane that
    wrote it), then the cell update reads them back from there.
    """
    N, H = h.shape
    acc = cuda.local.array(_ACC, float32)
    lane, group, row_tiles, col_tiles, tiles_per_round, cols_per_round, my_tile = _tile_rounds(
        N, width, lanes, 4)
    for tile0 in range(0, row_tiles, tiles_per_round):
        for col0 in range(0, col_tiles, cols_per_round):
            n_first, n0, jj0, active = _tile_origin(tile0, col0, group, my_tile,
                                                    tiles_per_round, cols_per_round, N, width, 4)
            q0, q1 = min(jj0, width - 1), min(jj0 + 1, width - 1)
            q2, q3 = min(jj0 + 2, width - 1), min(jj0 + 3, width - 1)
            s0 = WEIGHT_FLOATS + my_tile * _ROWS * _CHUNK
            for g in range(4):
                for a in range(_ACC):
                    acc[a] = _ZERO
                jc = g * width * cached_k
                jt = (g * H + first) * H
                _chunk_products(acc, cache, h, 0, H, n_first, tiles_per_round * _ROWS, s0,
                                active, lane, lanes, cached_k, 0, jc + q0 * cached_k,
                                jc + q1 * cached_k, jc + q2 * cached_k, jc + q3 * cached_k, u_t,
                                jt + q0 * H, jt + q1 * H, jt + q2 * H, jt + q3 * H,
                                recurrent_mask, g, True)
                _group_sum(acc, lanes)
                _share_sums(cache, acc, lane, group)
                if active:
                    for a in range(lane, _ACC, lanes):
                        n, jj, live = _tile_item(a, n0, jj0, N, width)
                        if live:
                            xw[t, n, g * H + first + jj] += cache[WEIGHT_FLOATS + group * _ACC
                                                                  + a]
            if active:
                for a in range(lane, _ACC, lanes):
                    n, jj, live = _tile_item(a, n0, jj0, N, width)
                    if live:
                        _forward_unit(t, n, first + jj, _ZERO, _ZERO, _ZERO, _ZERO, xw, mask, h,
                                      h_next, c_prev, c, activation, recurrent_activation,
                                      zero_output_for_mask, outputs, h_seq, c_seq, gates)


# ---------------------------------------------------------------------------
# Backward device functions.


@device
def _backward_weights(u, cache, cached_c, first, width):
    """Cache layout: row jj (unit first + jj) holds columns c < cached_c of `U[first + jj, :]`."""
    for idx in range(cuda.threadIdx.x, width * cached_c, cuda.blockDim.x):
        row = idx // cached_c
        cache[idx] = u[first + row, idx - row * cached_c]


@device
def backward_initial_states(first, width, d_h_n, d_c_n, dh, dc, carried):
    for idx in range(cuda.threadIdx.x, dh.shape[0] * width, cuda.blockDim.x):
        n = idx // width
        j = first + idx - n * width
        dh[n, j] = d_h_n[n, j]
        dc[n, j] = d_c_n[n, j]
        carried[n, j] = _ZERO


@device
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


@device
def backward_cells(t, first, width, mask, activation, recurrent_activation,
                    zero_output_for_mask, c_seq, gates, d_outputs, d_xw, dh, dc, carried):
    """Pointwise gradients of step t for the block's units, one cell per thread."""
    for idx in range(cuda.threadIdx.x, dh.shape[0] * width, cuda.blockDim.x):
        n = idx // width
        _backward_unit(t, n, first + idx - n * width, mask, activation, recurrent_activation,
                       zero_output_for_mask, c_seq, gates, d_outputs, d_xw, dh, dc, carried)


@device
def _fold_gate(total, acc, r, recurrent_mask, g, n, first, rows):
    """total[4r + q] += acc[4r + q] times gate g's dropout mask at (n, unit q)."""
    total[4 * r] += recurrent_mask[g, n, first + rows[0]] * acc[4 * r]
    total[4 * r + 1] += recurrent_mask[g, n, first + rows[1]] * acc[4 * r + 1]
    total[4 * r + 2] += recurrent_mask[g, n, first + rows[2]] * acc[4 * r + 2]
    total[4 * r + 3] += recurrent_mask[g, n, first + rows[3]] * acc[4 * r + 3]


@device
def backward_products(t, u_flat, cache, cached_c, first, width, lanes, mask, recurrent_mask,
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
    lane, group, row_tiles, col_tiles, tiles_per_round, cols_per_round, my_tile = _tile_rounds(
        N, width, lanes, 4)
    masked = mask.shape[0] > 0
    for tile0 in range(0, row_tiles, tiles_per_round):
        for col0 in range(0, col_tiles, cols_per_round):
            n_first, n0, jj0, active = _tile_origin(tile0, col0, group, my_tile,
                                                    tiles_per_round, cols_per_round, N, width, 4)
            rows = (min(jj0, width - 1), min(jj0 + 1, width - 1), min(jj0 + 2, width - 1),
                    min(jj0 + 3, width - 1))
            for a in range(_ACC):
                acc[a] = _ZERO
                if dropout:
                    total[a] = _ZERO
            s0 = WEIGHT_FLOATS + my_tile * _ROWS * _CHUNK
            for g in range(4):
                if dropout:
                    for a in range(_ACC):
                        acc[a] = _ZERO
                u0 = (first + rows[0]) * 4 * H + g * H
                _chunk_products(acc, cache, dz, g * H, H, n_first, tiles_per_round * _ROWS, s0,
                                active, lane, lanes, cached_c, g * H,
                                rows[0] * cached_c + g * H, rows[1] * cached_c + g * H,
                                rows[2] * cached_c + g * H, rows[3] * cached_c + g * H, u_flat,
                                u0, u0 + (rows[1] - rows[0]) * 4 * H,
                                u0 + (rows[2] - rows[0]) * 4 * H,
                                u0 + (rows[3] - rows[0]) * 4 * H, recurrent_mask, 0, False)
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
                    n, jj, live = _tile_item(a, n0, jj0, N, width)
                    if live and (not masked or mask[t, n]):
                        dh[n, first + jj] = cache[WEIGHT_FLOATS + group * _ACC + a]
