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
   `_CACHE_FLOATS` floats (48 KB of static shared memory, the most numba-cuda
   can declare), it keeps the first ones and streams the rest through L2 with
   plain coalesced loads every step.
3. Inside a block, a group of `lanes` threads computes one unit's four gate
   pre-activations for `_ROWS` batch rows at a time: each lane sums over a
   strided part of the H recurrent inputs and a butterfly of warp shuffles
   adds the partial sums. Row tiles and units are spread over the groups with
   block-stride loops, so any N and H run.
4. A grid-wide barrier (`cuda.cg.this_grid().sync()`, a cooperative launch)
   separates timesteps; `h` is double-buffered in global memory so that one
   barrier per step suffices. The backward pass needs one barrier per step
   too: the pointwise gradients of a step and the recurrent product of the
   next one run on the same threads.
5. When the whole problem is small, one block runs it with `syncthreads` as
   the barrier (`*_block` kernels, no cooperative launch): the same device
   functions, a cheaper barrier.

The host drivers take NumPy arrays (copied to the device, results copied back
as NumPy: the `kernels.cpu` semantics, which also runs these kernels in the
CUDA simulator) or device arrays: anything with `__cuda_array_interface__`
(PyTorch CUDA tensors, Numba device arrays), a `StridedMemoryView`, or a CUDA
DLPack capsule provider. Device inputs give Numba device arrays back, written
asynchronously on the given stream.

Kernels compile on first use, so importing this module needs no GPU.
"""

import numpy as np
from cuda.core.utils import StridedMemoryView
from numba import config, cuda, float32, types

from .gates import compile_gates

_gates = compile_gates(cuda.jit(device=True, inline="always"))
_cell_forward = _gates.cell_forward
_cell_backward = _gates.cell_backward

# Static shared memory per block is capped at 48 KB (numba-cuda declares no
# more); 1 KB of headroom stays below the cap.
_CACHE_FLOATS = 12 * 1024 - 256
# Batch rows per thread group: each cached weight read serves this many rows.
_ROWS = 4
_ACC = 4 * _ROWS
_TILE = 32
_TILE_PADDED = _TILE + 1  # one spare column: no bank conflicts reading a tile column
_FULL_WARP = 0xFFFFFFFF
# At most 256 threads and 2 blocks per SM: the compiler keeps the kernels
# within 128 registers, which it does without spilling (ptxas 13.0, sm_90:
# 122 forward, 106 backward). A tighter bound (64 registers, 4 blocks per SM,
# twice the weights on chip) spills. Tune on the GPU.
_MAX_THREADS = 256
_LAUNCH_BOUNDS = (_MAX_THREADS, 2)
# One block (block barrier) instead of a cooperative grid when a step needs at
# most this many multiply-adds and the weights fit in one block's cache: a
# grid barrier costs about a microsecond. Tune on the GPU.
_SINGLE_BLOCK_WORK = 1 << 17
_DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged
_ZERO = np.float32(0.0)
_SIMULATED = bool(config.ENABLE_CUDASIM)
# Device functions are inlined in Numba IR: a device function compiled on its
# own asks the driver for the compute capability, which needs a GPU.
_device = cuda.jit(device=True, inline="always")
# The simulator's jit takes no launch bounds.
_kernel = cuda.jit(cache=True) if _SIMULATED else cuda.jit(cache=True,
                                                          launch_bounds=_LAUNCH_BOUNDS)


# ---------------------------------------------------------------------------
# Device functions shared by the forward kernels.


@_device
def _block_slice(H, units):
    """First unit and number of units owned by this block."""
    first = cuda.blockIdx.x * units
    return first, max(0, min(units, H - first))


@_device
def _row_tiles(N):
    return (N + _ROWS - 1) // _ROWS


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
def _accumulate_rows(acc, h, recurrent_mask, n0, k, u_i, u_f, u_c, u_o):
    """acc[4r + g] += (h * recurrent_mask[g])[n0 + r, k] * u_g for each row r."""
    N = h.shape[0]
    dropout = recurrent_mask.shape[0] > 0
    for r in range(_ROWS):
        n = n0 + r
        if n < N:
            hv = h[n, k]
            if dropout:
                acc[4 * r] += hv * recurrent_mask[0, n, k] * u_i
                acc[4 * r + 1] += hv * recurrent_mask[1, n, k] * u_f
                acc[4 * r + 2] += hv * recurrent_mask[2, n, k] * u_c
                acc[4 * r + 3] += hv * recurrent_mask[3, n, k] * u_o
            else:
                acc[4 * r] += hv * u_i
                acc[4 * r + 1] += hv * u_f
                acc[4 * r + 2] += hv * u_c
                acc[4 * r + 3] += hv * u_o


@_device
def _forward_products(acc, active, h, recurrent_mask, u_t, cache, cached_k, width, jj, j,
                      n0, lane, lanes):
    """This lane's share of z[n0 + r, g*H + j] = (h * mask) @ U, in acc[4r + g].

    The first `cached_k` rows of the block's weight columns come from the
    shared-memory cache, the others from `u_t` [4H, H] through L2.
    """
    H = h.shape[1]
    for a in range(_ACC):
        acc[a] = _ZERO
    if not active:
        return
    for k in range(lane, H, lanes):
        if k < cached_k:
            _accumulate_rows(acc, h, recurrent_mask, n0, k,
                             cache[jj * cached_k + k],
                             cache[(width + jj) * cached_k + k],
                             cache[(2 * width + jj) * cached_k + k],
                             cache[(3 * width + jj) * cached_k + k])
        else:
            _accumulate_rows(acc, h, recurrent_mask, n0, k, u_t[j, k], u_t[H + j, k],
                             u_t[2 * H + j, k], u_t[3 * H + j, k])


@_device
def _forward_unit(t, n, j, z_i, z_f, z_c, z_o, xw, mask, h, h_next, c, activation,
                  recurrent_activation, zero_output_for_mask, outputs, h_seq, c_seq, gates):
    """Updates unit j of row n at step t from its recurrent pre-activations z_*."""
    H = h.shape[1]
    save = gates.shape[0] > 0
    if mask.shape[0] > 0 and not mask[t, n]:
        h_next[n, j] = h[n, j]
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
            xw[t, n, 3 * H + j] + z_o, c[n, j], activation, recurrent_activation)
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
def _forward_prologue(u_t, cache, cached_k, first, width, h0, c0, h, c, h_seq, c_seq):
    """Fills the block's weight cache and its units of the initial states.

    Cache layout: column `g * width + jj` (gate g of unit first + jj) holds
    rows k < cached_k of `U[:, g*H + first + jj]`, contiguous in k.
    """
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    H = u_t.shape[1]
    for idx in range(tid, 4 * width * cached_k, threads):
        column = idx // cached_k
        gate = column // width
        cache[idx] = u_t[gate * H + first + column - gate * width, idx - column * cached_k]
    N = h0.shape[0]
    for idx in range(tid, N * width, threads):
        n = idx // width
        j = first + idx - n * width
        h[n, j] = h0[n, j]
        c[n, j] = c0[n, j]
        if h_seq.shape[0] > 0:
            h_seq[0, n, j] = h0[n, j]
            c_seq[0, n, j] = c0[n, j]


@_device
def _forward_step(t, xw, u_t, cache, cached_k, first, width, lanes, h, h_next, c, mask,
                  recurrent_mask, activation, recurrent_activation, zero_output_for_mask,
                  outputs, h_seq, c_seq, gates):
    """One timestep for the block's units: reads h, writes h_next and c."""
    N = h.shape[0]
    acc = cuda.local.array(_ACC, float32)
    lane = cuda.threadIdx.x % lanes
    group = cuda.threadIdx.x // lanes
    groups = cuda.blockDim.x // lanes
    items = _row_tiles(N) * width
    # Block-uniform trip count: every group reaches each `_group_sum`.
    for base in range(0, items, groups):
        item = base + group
        active = item < items
        n0 = (item // width) * _ROWS
        jj = item % width
        _forward_products(acc, active, h, recurrent_mask, u_t, cache, cached_k, width, jj,
                          first + jj, n0, lane, lanes)
        _group_sum(acc, lanes)
        if active and lane == 0:
            for r in range(_ROWS):
                if n0 + r < N:
                    _forward_unit(t, n0 + r, first + jj, acc[4 * r], acc[4 * r + 1],
                                  acc[4 * r + 2], acc[4 * r + 3], xw, mask, h, h_next, c,
                                  activation, recurrent_activation, zero_output_for_mask,
                                  outputs, h_seq, c_seq, gates)


@_device
def _copy_units(src, dst, first, width):
    """dst[:, first:first + width] = src[:, first:first + width]."""
    for idx in range(cuda.threadIdx.x, src.shape[0] * width, cuda.blockDim.x):
        n = idx // width
        j = first + idx - n * width
        dst[n, j] = src[n, j]


# ---------------------------------------------------------------------------
# Forward kernels.


@_kernel
def lstm_forward_persistent(units, lanes, cache_floats, xw, recurrent_kernel_t, h0, c0, mask,
                            recurrent_mask, activation, recurrent_activation,
                            zero_output_for_mask, outputs, h_n, c_n, h_seq, c_seq, gates,
                            h_buf):
    """Runs the LSTM recurrence over all timesteps in one cooperative launch.

    Launch `ceil(H / units)` blocks of a multiple of `lanes` threads, at most
    `max_cooperative_grid_blocks`.

    Args:
        units: hidden units per block.
        lanes: threads per unit group, a power of two up to 32.
        cache_floats: shared-memory floats used to cache weights, at most
            `_CACHE_FLOATS`.
        recurrent_kernel_t: [4H, H], `recurrent_kernel` transposed.
        h_buf: [2, N, H] scratch: the hidden state, double-buffered.
        Others: as for `kernels.cpu.lstm_forward`.
    """
    grid = cuda.cg.this_grid()
    cache = cuda.shared.array(_CACHE_FLOATS, float32)
    H = h0.shape[1]
    first, width = _block_slice(H, units)
    cached_k = min(H, cache_floats // (4 * units))
    _forward_prologue(recurrent_kernel_t, cache, cached_k, first, width, h0, c0, h_buf[0], c_n,
                      h_seq, c_seq)
    grid.sync()
    T = outputs.shape[0]
    for t in range(T):
        _forward_step(t, xw, recurrent_kernel_t, cache, cached_k, first, width, lanes,
                      h_buf[t % 2], h_buf[(t + 1) % 2], c_n, mask, recurrent_mask, activation,
                      recurrent_activation, zero_output_for_mask, outputs, h_seq, c_seq, gates)
        grid.sync()
    _copy_units(h_buf[T % 2], h_n, first, width)


@_kernel
def lstm_forward_block(units, lanes, cache_floats, xw, recurrent_kernel_t, h0, c0, mask,
                       recurrent_mask, activation, recurrent_activation, zero_output_for_mask,
                       outputs, h_n, c_n, h_seq, c_seq, gates, h_buf):
    """`lstm_forward_persistent` for a one-block launch (`units >= H`).

    The block barrier replaces the grid barrier, so the launch is not
    cooperative. Same arguments as `lstm_forward_persistent`.
    """
    cache = cuda.shared.array(_CACHE_FLOATS, float32)
    H = h0.shape[1]
    first, width = _block_slice(H, units)
    cached_k = min(H, cache_floats // (4 * units))
    _forward_prologue(recurrent_kernel_t, cache, cached_k, first, width, h0, c0, h_buf[0], c_n,
                      h_seq, c_seq)
    cuda.syncthreads()
    T = outputs.shape[0]
    for t in range(T):
        _forward_step(t, xw, recurrent_kernel_t, cache, cached_k, first, width, lanes,
                      h_buf[t % 2], h_buf[(t + 1) % 2], c_n, mask, recurrent_mask, activation,
                      recurrent_activation, zero_output_for_mask, outputs, h_seq, c_seq, gates)
        cuda.syncthreads()
    _copy_units(h_buf[T % 2], h_n, first, width)


# ---------------------------------------------------------------------------
# Device functions shared by the backward kernels.


@_device
def _backward_prologue(recurrent_kernel, cache, cached_c, first, width, d_h_n, d_c_n, dh, dc,
                       carried):
    """Fills the block's weight cache and its units of the gradient states.

    Cache layout: row jj (unit first + jj) holds columns c < cached_c of
    `U[first + jj, :]`.
    """
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    for idx in range(tid, width * cached_c, threads):
        row = idx // cached_c
        cache[idx] = recurrent_kernel[first + row, idx - row * cached_c]
    N = dh.shape[0]
    for idx in range(tid, N * width, threads):
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
def _backward_cells(t, first, width, lanes, mask, activation, recurrent_activation,
                    zero_output_for_mask, c_seq, gates, d_outputs, d_xw, dh, dc, carried):
    """Pointwise gradients of step t for the block's units.

    Each (row tile, unit) item runs on lane 0 of the same group as in
    `_backward_products`, which owns that item's dh.
    """
    N = dh.shape[0]
    group = cuda.threadIdx.x // lanes
    groups = cuda.blockDim.x // lanes
    if cuda.threadIdx.x % lanes != 0:
        return
    for item in range(group, _row_tiles(N) * width, groups):
        n0 = (item // width) * _ROWS
        j = first + item % width
        for r in range(_ROWS):
            if n0 + r < N:
                _backward_unit(t, n0 + r, j, mask, activation, recurrent_activation,
                               zero_output_for_mask, c_seq, gates, d_outputs, d_xw, dh, dc,
                               carried)


@_device
def _recurrent_grad_products(acc, active, dz, recurrent_kernel, cache, cached_c, jj, j, n0,
                             lane, lanes):
    """This lane's share of sum_k dz[n0 + r, g*H + k] * U[j, g*H + k], in acc[4r + g]."""
    H = recurrent_kernel.shape[0]
    N = dz.shape[0]
    for a in range(_ACC):
        acc[a] = _ZERO
    if not active:
        return
    for g in range(4):
        for k in range(lane, H, lanes):
            col = g * H + k
            if col < cached_c:
                u = cache[jj * cached_c + col]
            else:
                u = recurrent_kernel[j, col]
            for r in range(_ROWS):
                n = n0 + r
                if n < N:
                    acc[4 * r + g] += dz[n, col] * u


@_device
def _backward_products(t, recurrent_kernel, cache, cached_c, first, width, lanes, mask,
                       recurrent_mask, d_xw, dh):
    """dh[n, j] = (d_xw[t] @ U.T)[n, j], per-gate dropout masks applied, for live rows."""
    N = dh.shape[0]
    acc = cuda.local.array(_ACC, float32)
    lane = cuda.threadIdx.x % lanes
    group = cuda.threadIdx.x // lanes
    groups = cuda.blockDim.x // lanes
    items = _row_tiles(N) * width
    dropout = recurrent_mask.shape[0] > 0
    masked = mask.shape[0] > 0
    for base in range(0, items, groups):
        item = base + group
        active = item < items
        n0 = (item // width) * _ROWS
        jj = item % width
        j = first + jj
        _recurrent_grad_products(acc, active, d_xw[t], recurrent_kernel, cache, cached_c, jj, j,
                                 n0, lane, lanes)
        _group_sum(acc, lanes)
        if active and lane == 0:
            for r in range(_ROWS):
                n = n0 + r
                if n < N and (not masked or mask[t, n]):
                    if dropout:
                        dh[n, j] = (acc[4 * r] * recurrent_mask[0, n, j]
                                    + acc[4 * r + 1] * recurrent_mask[1, n, j]
                                    + acc[4 * r + 2] * recurrent_mask[2, n, j]
                                    + acc[4 * r + 3] * recurrent_mask[3, n, j])
                    else:
                        dh[n, j] = acc[4 * r] + acc[4 * r + 1] + acc[4 * r + 2] + acc[4 * r + 3]


# ---------------------------------------------------------------------------
# Backward kernels.


@_kernel
def lstm_backward_persistent(units, lanes, cache_floats, recurrent_kernel, mask, recurrent_mask,
                             activation, recurrent_activation, zero_output_for_mask, c_seq,
                             gates, d_outputs, d_h_n, d_c_n, d_xw, d_h0, d_c0, carried):
    """Backpropagates through the recurrence (BPTT) in one cooperative launch.

    Launch as `lstm_forward_persistent`.

    Args:
        units, lanes, cache_floats: as for `lstm_forward_persistent`.
        recurrent_kernel: [H, 4H].
        mask, recurrent_mask, activation, recurrent_activation,
        zero_output_for_mask: as for `lstm_forward_persistent`.
        c_seq: [T+1, N, H] and gates: [T, N, 4H], saved by the forward pass.
        d_outputs: [T, N, H] gradient of the outputs.
        d_h_n, d_c_n: [N, H] gradients of the final states.
        d_xw: [T, N, 4H] gradient of the input projection, written.
        d_h0, d_c0: [N, H] gradients of the initial states, written (they
            hold the running dh and dc during the pass).
        carried: [N, H] scratch: output gradient carried through masked
            steps.
    """
    grid = cuda.cg.this_grid()
    cache = cuda.shared.array(_CACHE_FLOATS, float32)
    H = recurrent_kernel.shape[0]
    first, width = _block_slice(H, units)
    cached_c = min(4 * H, cache_floats // units)
    _backward_prologue(recurrent_kernel, cache, cached_c, first, width, d_h_n, d_c_n, d_h0, d_c0,
                       carried)
    cuda.syncthreads()
    for t in range(d_outputs.shape[0] - 1, -1, -1):
        _backward_cells(t, first, width, lanes, mask, activation, recurrent_activation,
                        zero_output_for_mask, c_seq, gates, d_outputs, d_xw, d_h0, d_c0, carried)
        grid.sync()
        _backward_products(t, recurrent_kernel, cache, cached_c, first, width, lanes, mask,
                           recurrent_mask, d_xw, d_h0)


@_kernel
def lstm_backward_block(units, lanes, cache_floats, recurrent_kernel, mask, recurrent_mask,
                        activation, recurrent_activation, zero_output_for_mask, c_seq, gates,
                        d_outputs, d_h_n, d_c_n, d_xw, d_h0, d_c0, carried):
    """`lstm_backward_persistent` for a one-block launch (`units >= H`).

    Same arguments as `lstm_backward_persistent`; not a cooperative launch.
    """
    cache = cuda.shared.array(_CACHE_FLOATS, float32)
    H = recurrent_kernel.shape[0]
    first, width = _block_slice(H, units)
    cached_c = min(4 * H, cache_floats // units)
    _backward_prologue(recurrent_kernel, cache, cached_c, first, width, d_h_n, d_c_n, d_h0, d_c0,
                       carried)
    cuda.syncthreads()
    for t in range(d_outputs.shape[0] - 1, -1, -1):
        _backward_cells(t, first, width, lanes, mask, activation, recurrent_activation,
                        zero_output_for_mask, c_seq, gates, d_outputs, d_xw, d_h0, d_c0, carried)
        cuda.syncthreads()
        _backward_products(t, recurrent_kernel, cache, cached_c, first, width, lanes, mask,
                           recurrent_mask, d_xw, d_h0)


@cuda.jit(cache=True)
def transpose(a, out):
    """out[C, R] = a[R, C].T through shared-memory tiles; needs blockDim.x == 32.

    Grid-stride over tiles, so any grid covers any shape.
    """
    tile = cuda.shared.array((_TILE, _TILE_PADDED), float32)
    R, C = a.shape
    tx = cuda.threadIdx.x
    for row0 in range(cuda.blockIdx.y * _TILE, R, cuda.gridDim.y * _TILE):
        for col0 in range(cuda.blockIdx.x * _TILE, C, cuda.gridDim.x * _TILE):
            for dy in range(cuda.threadIdx.y, _TILE, cuda.blockDim.y):
                if row0 + dy < R and col0 + tx < C:
                    tile[dy, tx] = a[row0 + dy, col0 + tx]
            cuda.syncthreads()
            for dy in range(cuda.threadIdx.y, _TILE, cuda.blockDim.y):
                if col0 + dy < C and row0 + tx < R:
                    out[col0 + dy, row0 + tx] = tile[tx, dy]
            cuda.syncthreads()


# ---------------------------------------------------------------------------
# Kernel signatures: what the host drivers launch, for offline compilation.


def _array(ndim, dtype=types.float32):
    return types.Array(dtype, ndim, "C")


_LAUNCH_TYPES = (types.int64, types.int64, types.int64)  # units, lanes, cache_floats
_FORWARD_SIGNATURE = _LAUNCH_TYPES + (
    _array(3), _array(2), _array(2), _array(2), _array(2, types.boolean), _array(3),
    types.int64, types.int64, types.boolean, _array(3), _array(2), _array(2), _array(3),
    _array(3), _array(3), _array(3))
_BACKWARD_SIGNATURE = _LAUNCH_TYPES + (
    _array(2), _array(2, types.boolean), _array(3), types.int64, types.int64, types.boolean,
    _array(3), _array(3), _array(3), _array(2), _array(2), _array(3), _array(2), _array(2),
    _array(2))

# Kernel name -> the Numba signatures the host drivers launch it with.
SIGNATURES = {
    "lstm_forward_persistent": (_FORWARD_SIGNATURE,),
    "lstm_forward_block": (_FORWARD_SIGNATURE,),
    "lstm_backward_persistent": (_BACKWARD_SIGNATURE,),
    "lstm_backward_block": (_BACKWARD_SIGNATURE,),
    "transpose": ((_array(2), _array(2)),),
}


def kernel_by_name(name):
    """The kernel called `name` in `SIGNATURES`."""
    if name not in SIGNATURES:
        raise ValueError(f"name must be one of {sorted(SIGNATURES)}; received {name!r}.")
    return globals()[name]


# ---------------------------------------------------------------------------
# Host drivers.


def forward(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, activation,
            recurrent_activation, zero_output_for_mask, training, *, stream=None,
            block_size=256, lanes=32, units_per_block=None, cache_floats=None,
            single_block=None):
    """Host driver for the forward kernels.

    Args:
        xw: [T, N, 4H] float32 input projection, bias included.
        recurrent_kernel: [H, 4H]; h0, c0: [N, H].
        mask: [T, N] bool or None; recurrent_mask: [4, N, H] or None.
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
        lanes: threads that share one unit's dot products, a power of two
            up to 32.
        units_per_block: hidden units per block; None picks a slice that
            keeps the weights on chip and spreads over the SMs.
        cache_floats: shared-memory floats used to cache weights, at most
            `_CACHE_FLOATS` (the default); smaller values stream more
            weights through L2.
        single_block: True runs one block (no cooperative launch), False a
            cooperative grid, None picks by problem size.

    Returns:
        `(outputs, h_n, c_n, saved)`, with `saved = (h_seq, c_seq, gates)`
        when training, else None. NumPy arrays when `xw` is a NumPy array,
        otherwise Numba device arrays written on `stream`.
    """
    cache_floats = _check_launch_options(block_size, lanes, units_per_block, cache_floats)
    stream = _as_stream(stream)
    on_host = not _is_device_array(xw)
    T, N, H = _sequence_shape(xw, "xw", 4)
    f32 = np.float32
    xw = _to_device(xw, "xw", (T, N, 4 * H), f32, stream)
    recurrent_kernel = _to_device(recurrent_kernel, "recurrent_kernel", (H, 4 * H), f32, stream)
    h0 = _to_device(h0, "h0", (N, H), f32, stream)
    c0 = _to_device(c0, "c0", (N, H), f32, stream)
    mask = _mask_or_empty(mask, T, N, stream)
    recurrent_mask = _recurrent_mask_or_empty(recurrent_mask, N, H, stream)
    outputs = cuda.device_array((T, N, H), f32, stream=stream)
    h_n = cuda.device_array((N, H), f32, stream=stream)
    c_n = cuda.device_array((N, H), f32, stream=stream)
    h_seq = cuda.device_array((T + 1 if training else 0, N, H), f32, stream=stream)
    c_seq = cuda.device_array((T + 1 if training else 0, N, H), f32, stream=stream)
    gates = cuda.device_array((T if training else 0, N, 4 * H), f32, stream=stream)
    h_buf = cuda.device_array((2, N, H), f32, stream=stream)
    recurrent_kernel_t = _transposed(recurrent_kernel, block_size, stream)
    _launch((lstm_forward_block, lstm_forward_persistent),
            (xw, recurrent_kernel_t, h0, c0, mask, recurrent_mask, int(activation),
             int(recurrent_activation), bool(zero_output_for_mask), outputs, h_n, c_n, h_seq,
             c_seq, gates, h_buf),
            N, H, stream, block_size, lanes, units_per_block, cache_floats, single_block)
    results = (outputs, h_n, c_n, h_seq, c_seq, gates)
    if on_host:
        results = _to_host(results, stream)
    outputs, h_n, c_n, h_seq, c_seq, gates = results
    saved = (h_seq, c_seq, gates) if training else None
    return outputs, h_n, c_n, saved


def backward(recurrent_kernel, mask, recurrent_mask, activation, recurrent_activation,
             zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n, *, stream=None,
             block_size=256, lanes=32, units_per_block=None, cache_floats=None,
             single_block=None):
    """Host driver for the backward kernels.

    Args:
        recurrent_kernel, mask, recurrent_mask, activation,
        recurrent_activation, zero_output_for_mask: as for `forward`.
        saved: `(h_seq, c_seq, gates)` from `forward(..., training=True)`.
        d_outputs: [T, N, H] gradient of the outputs.
        d_h_n, d_c_n: [N, H] gradients of the final states.
        stream, block_size, lanes, units_per_block, cache_floats,
        single_block: as for `forward`.

    Returns:
        `(d_xw, d_h0, d_c0)`: NumPy arrays when `d_outputs` is a NumPy array,
        otherwise Numba device arrays written on `stream`.
    """
    if saved is None or len(saved) != 3:
        raise ValueError("saved must be the (h_seq, c_seq, gates) returned by "
                         f"forward(..., training=True); received {saved!r}.")
    cache_floats = _check_launch_options(block_size, lanes, units_per_block, cache_floats)
    stream = _as_stream(stream)
    on_host = not _is_device_array(d_outputs)
    T, N, H = _sequence_shape(d_outputs, "d_outputs", 1)
    f32 = np.float32
    _, c_seq, gates = saved
    recurrent_kernel = _to_device(recurrent_kernel, "recurrent_kernel", (H, 4 * H), f32, stream)
    mask = _mask_or_empty(mask, T, N, stream)
    recurrent_mask = _recurrent_mask_or_empty(recurrent_mask, N, H, stream)
    c_seq = _to_device(c_seq, "c_seq", (T + 1, N, H), f32, stream)
    gates = _to_device(gates, "gates", (T, N, 4 * H), f32, stream)
    d_outputs = _to_device(d_outputs, "d_outputs", (T, N, H), f32, stream)
    d_h_n = _to_device(d_h_n, "d_h_n", (N, H), f32, stream)
    d_c_n = _to_device(d_c_n, "d_c_n", (N, H), f32, stream)
    d_xw = cuda.device_array((T, N, 4 * H), f32, stream=stream)
    d_h0 = cuda.device_array((N, H), f32, stream=stream)
    d_c0 = cuda.device_array((N, H), f32, stream=stream)
    carried = cuda.device_array((N, H), f32, stream=stream)
    _launch((lstm_backward_block, lstm_backward_persistent),
            (recurrent_kernel, mask, recurrent_mask, int(activation), int(recurrent_activation),
             bool(zero_output_for_mask), c_seq, gates, d_outputs, d_h_n, d_c_n, d_xw, d_h0, d_c0,
             carried),
            N, H, stream, block_size, lanes, units_per_block, cache_floats, single_block)
    results = (d_xw, d_h0, d_c0)
    return _to_host(results, stream) if on_host else results


def _launch(kernels, data_args, N, H, stream, block_size, lanes, units_per_block, cache_floats,
            single_block):
    """Picks the kernel and its grid, checks that the grid fits, and launches.

    Args:
        kernels: `(one_block_kernel, cooperative_kernel)`, which take
            `(units, lanes, cache_floats, *data_args)`.
    """
    if single_block is None:
        single_block = 4 * H * H <= cache_floats and N * 4 * H * H <= _SINGLE_BLOCK_WORK
    if single_block:
        if units_per_block is not None and units_per_block < H:
            raise ValueError(f"single_block=True needs units_per_block >= H={H}; "
                             f"received units_per_block={units_per_block}.")
        kernel, units, blocks = kernels[0], H, 1
    else:
        kernel = kernels[1]
        limit = _max_cooperative_blocks(kernel, (1, lanes, cache_floats) + data_args, block_size)
        units, blocks = _grid_shape(H, units_per_block, limit, cache_floats, block_size)
    kernel[blocks, block_size, stream](units, lanes, cache_floats, *data_args)


def _grid_shape(H, units_per_block, max_blocks, cache_floats, block_size):
    """`(units, blocks)`: units per block and the cooperative grid size."""
    if units_per_block is None:
        fit = max(1, cache_floats // (4 * H))  # widest slice whose weights stay on chip
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
        return _CACHE_FLOATS
    if not 0 <= cache_floats <= _CACHE_FLOATS:
        raise ValueError(f"cache_floats must be between 0 and {_CACHE_FLOATS}; "
                         f"received {cache_floats}.")
    return int(cache_floats)


def _transposed(matrix, block_size, stream):
    rows, cols = matrix.shape
    out = cuda.device_array((cols, rows), np.float32, stream=stream)
    grid = (min(-(-cols // _TILE), 1024), min(-(-rows // _TILE), 1024))
    transpose[grid, (_TILE, max(1, block_size // _TILE)), stream](matrix, out)
    return out


def _as_stream(stream):
    if stream is None or (isinstance(stream, int) and stream == 0):
        return cuda.default_stream()
    if isinstance(stream, int):
        return cuda.external_stream(stream)
    return stream


def _sequence_shape(array, name, gate_factor):
    """`(T, N, H)` of a time-major [T, N, gate_factor * H] array."""
    shape = tuple(array.shape)
    if len(shape) != 3 or shape[2] % gate_factor or shape[2] == 0:
        expected = "[T, N, 4H]" if gate_factor == 4 else "[T, N, H]"
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


def _mask_or_empty(mask, T, N, stream):
    if mask is None:
        return cuda.device_array((0, N), np.bool_, stream=stream)
    return _to_device(mask, "mask", (T, N), np.bool_, stream)


def _recurrent_mask_or_empty(recurrent_mask, N, H, stream):
    if recurrent_mask is None:
        return cuda.device_array((0, N, H), np.float32, stream=stream)
    return _to_device(recurrent_mask, "recurrent_mask", (4, N, H), np.float32, stream)


def _to_host(arrays, stream):
    host = tuple(a.copy_to_host(stream=stream) for a in arrays)
    stream.synchronize()
    return host
