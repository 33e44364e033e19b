"""Runs a kernel over blocks of batch rows on a few threads, dynamically scheduled.

The kernels release the GIL (`nogil=True`), so plain Python threads run them
in parallel. Blocks are handed out one at a time to whichever thread is free,
the calling thread included: a core that is slow or busy with another process
runs fewer blocks instead of holding up every step, as a barrier per timestep
would. Work too small to pay for a thread hand-off runs in the calling thread.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba

MIN_ROWS_PER_BLOCK = 8
BLOCKS_PER_THREAD = 2
MIN_FLOPS_PER_BLOCK = 1 << 23

_pool = None
_pool_lock = threading.Lock()


def thread_count():
    """Threads the kernels may use: the usable cores, capped by Numba's thread count
    (`NUMBA_NUM_THREADS`, `numba.set_num_threads`)."""
    return max(1, min(len(os.sched_getaffinity(0)), numba.get_num_threads()))


def block_bounds(rows, flops_per_row, threads):
    """[(r0, r1), ...]: blocks of at least MIN_ROWS_PER_BLOCK rows (a multiple of 8,
    the row tile), BLOCKS_PER_THREAD per thread where the rows allow, none with
    less than MIN_FLOPS_PER_BLOCK of work."""
    wanted = max(1, min(threads * BLOCKS_PER_THREAD, rows * flops_per_row // MIN_FLOPS_PER_BLOCK))
    size = max(MIN_ROWS_PER_BLOCK, -(-rows // wanted))
    size = -(-size // MIN_ROWS_PER_BLOCK) * MIN_ROWS_PER_BLOCK
    return [(r0, min(r0 + size, rows)) for r0 in range(0, rows, size)]


def run_blocks(kernel, arguments, rows, flops_per_row):
    """Calls `kernel(r0, r1, *arguments)` for every block of `rows` batch rows."""
    threads = thread_count()
    bounds = block_bounds(rows, flops_per_row, threads)
    if len(bounds) == 1:
        kernel(0, rows, *arguments)
        return
    blocks = _Blocks(kernel, arguments, bounds)
    pool = _shared_pool(threads - 1)
    for _ in range(min(threads, len(bounds)) - 1):
        pool.submit(blocks.work)
    blocks.work()
    blocks.wait()


class _Blocks:
    """The blocks of one call: taken one at a time by whichever thread asks first."""

    def __init__(self, kernel, arguments, bounds):
        self._kernel, self._arguments, self._bounds = kernel, arguments, bounds
        self._next = 0
        self._unfinished = len(bounds)
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._error = None

    def work(self):
        while True:
            with self._lock:
                if self._next == len(self._bounds):
                    return
                r0, r1 = self._bounds[self._next]
                self._next += 1
            try:
                self._kernel(r0, r1, *self._arguments)
            except BaseException as error:  # re-raised in the calling thread
                self._error = error
            with self._lock:
                self._unfinished -= 1
                if self._unfinished == 0:
                    self._finished.set()

    def wait(self):
        """Waits for every block (not for the helpers: one still queued finds nothing to do)."""
        self._finished.wait()
        if self._error is not None:
            raise self._error


def _shared_pool(workers):
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="fusedlstm")
        return _pool
