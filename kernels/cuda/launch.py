"""Launch policy of the CUDA kernels: which kernel, how many blocks, which options.

`launch` picks the one-block, cooperative or step kernel and its grid;
`grid_shape` sizes a cooperative grid from the driver's occupancy answer
(`max_cooperative_blocks`); `check_launch_options` validates the drivers'
launch options.
"""

from numba import cuda

from .device import MAX_THREADS, SIMULATED, WEIGHT_FLOATS

# At most 256 threads and 2 blocks per SM: the compiler must keep the kernels
# within 128 registers (checked on the SASS by tests/test_cuda_sass.py), and
# `grid_shape` sizes cooperative grids from the driver's occupancy answer.
BLOCKS_PER_SM = 2
LAUNCH_BOUNDS = (MAX_THREADS, BLOCKS_PER_SM)
# One block (block barrier) instead of a cooperative grid when a step needs at
# most this many multiply-adds and the weights fit in one block's cache: a
# grid barrier costs about a microsecond. Tune on the GPU.
SINGLE_BLOCK_WORK = 1 << 17


def launch(kernels, data_args, steps, N, H, stream, block_size, units_per_block,
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
        single_block = 4 * H * H <= cache_floats and N * 4 * H * H <= SINGLE_BLOCK_WORK
    if single_block:
        if units_per_block is not None and units_per_block < H:
            raise ValueError(f"single_block=True needs units_per_block >= H={H}; "
                             f"received units_per_block={units_per_block}.")
        kernel, units, blocks = kernels[0], H, 1
    else:
        kernel = kernels[1]
        limit = max_cooperative_blocks(kernel, (1, cache_floats) + data_args, block_size)
        units, blocks = grid_shape(H, units_per_block, limit, cache_floats, block_size)
    kernel[blocks, block_size, stream](units, cache_floats, *data_args)


def grid_shape(H, units_per_block, max_blocks, cache_floats, block_size):
    """`(units, blocks)`: units per block and the cooperative grid size."""
    if units_per_block is None:
        # Widest slice that keeps at least 90% of its weights on chip.
        fit = max(1, cache_floats * 10 // (36 * H))
        spread = -(-H // multiprocessor_count())  # one block per SM
        units = max(min(fit, spread), -(-H // max_blocks))
    else:
        units = units_per_block
    blocks = -(-H // units)
    if blocks > max_blocks:
        raise ValueError(
            f"units_per_block={units} needs {blocks} blocks for H={H}, but a cooperative "
            f"launch of {block_size}-thread blocks fits at most {max_blocks} on this device.")
    return units, blocks


def max_cooperative_blocks(kernel, args, block_size):
    """The driver's limit on a cooperative grid of `kernel` compiled for `args`."""
    if SIMULATED:
        # The simulator runs blocks one after another: one block at most.
        overload = kernel.overloads[None]
    else:
        overload = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
    return overload.max_cooperative_grid_blocks(block_size)


def multiprocessor_count():
    return getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 1)


def check_launch_options(block_size, lanes, units_per_block, cache_floats):
    """Validates the drivers' launch options; returns `cache_floats` with its default."""
    if lanes not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"lanes must be a power of two from 1 to 32; received {lanes}.")
    if not 1 <= block_size <= MAX_THREADS or block_size % lanes:
        raise ValueError(f"block_size must be a multiple of lanes={lanes} between 1 and "
                         f"{MAX_THREADS}; received {block_size}.")
    if not SIMULATED and block_size % 32:
        raise ValueError("block_size must be a multiple of 32 (warp shuffles need whole "
                         f"warps); received {block_size}.")
    if units_per_block is not None and units_per_block < 1:
        raise ValueError(f"units_per_block must be >= 1; received {units_per_block}.")
    if cache_floats is None:
        return WEIGHT_FLOATS
    if not 0 <= cache_floats <= WEIGHT_FLOATS:
        raise ValueError(f"cache_floats must be between 0 and {WEIGHT_FLOATS}; "
                         f"received {cache_floats}.")
    return int(cache_floats)
