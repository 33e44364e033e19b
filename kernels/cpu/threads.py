"""Runs a kernel over blocks of batch rows on a few threads, dynamically scheduled.

The kernels release the GIL (`nogil=True`), so plain Python threads run them
in parallel. Blocks are handed out one at a time to whichever thread is free,
the calling thread included: a core that is slow or busy with another process
runs fewer blocks instead of holding up every step, as a barrier per timestep
would. Work too small to pay for a thread hand-off runs in the calling thread.

How many threads (`thread_count`):

- `FUSEDLSTM_NUM_THREADS`, when set: a positive integer, read once, on the
  first call (a `ValueError` names the variable and its value otherwise).
- Else the CPUs this process may run on: its affinity mask where the platform
  has one (`os.sched_getaffinity`, Linux; `os.process_cpu_count`, Python
  3.13+), else `os.cpu_count()` (macOS, Windows before 3.13), capped by a
  container's CPU quota (cgroup v2 `cpu.max`, cgroup v1 `cpu.cfs_quota_us`
  over `cpu.cfs_period_us`, rounded up), read once.

`set_thread_count(n)` overrides both for the whole process (None undoes it).
Numba's own thread count (`NUMBA_NUM_THREADS`, `numba.set_num_threads`) does
not apply: these are not Numba's threads, and asking Numba would start its
threading layer in every process. The pool follows the count of each call
(it is rebuilt when the count changes) and is rebuilt in a child process after
`os.fork()`, whose copy of the parent's pool has no live threads.
"""

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

MIN_ROWS_PER_BLOCK = 8
BLOCKS_PER_THREAD = 2
MIN_FLOPS_PER_BLOCK = 1 << 23
THREADS_ENV = "FUSEDLSTM_NUM_THREADS"
CGROUP_ROOT = "/sys/fs/cgroup"

_UNSET = object()
_requested = _UNSET  # FUSEDLSTM_NUM_THREADS, parsed once: an int or None
_override = None  # set_thread_count
_quota = _UNSET  # the cgroup CPU quota, read once: a float or None
_pool = None
_pool_workers = 0
_pool_lock = threading.Lock()


def thread_count():
    """Threads the kernels may use: `set_thread_count`'s, else `FUSEDLSTM_NUM_THREADS`,
    else the usable CPUs."""
    if _override is not None:
        return _override
    requested = requested_threads()
    return requested if requested is not None else usable_cpus()


def set_thread_count(count):
    """Sets the threads every later call uses, in every Python thread; None undoes it.

    Raises:
        ValueError: `count` is not a positive integer or None.
    """
    global _override
    if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                              or count < 1):
        raise ValueError(f"Expected a positive integer or None. Received: count={count!r}")
    _override = count


def requested_threads():
    """`FUSEDLSTM_NUM_THREADS` as a positive int (parsed on the first call), or None."""
    global _requested
    if _requested is _UNSET:
        _requested = parse_thread_count(os.environ.get(THREADS_ENV))
    return _requested


def parse_thread_count(value):
    """A positive int from the text of `FUSEDLSTM_NUM_THREADS`; None when unset or empty.

    Raises:
        ValueError: the text is not a positive integer.
    """
    if value is None or not value.strip():
        return None
    try:
        count = int(value.strip())
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(
            f"{THREADS_ENV} must be a positive integer (the threads the fused LSTM's CPU "
            f"kernels use). Received: {THREADS_ENV}={value!r}")
    return count


def usable_cpus():
    """CPUs this process may run on, capped by the container's CPU quota; at least 1."""
    if hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))
    elif hasattr(os, "process_cpu_count"):
        count = os.process_cpu_count() or 1
    else:
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota():
    """The cgroup CPU quota in CPUs (read on the first call), or None without one."""
    global _quota
    if _quota is _UNSET:
        _quota = read_cgroup_cpu_quota(CGROUP_ROOT)
    return _quota


def read_cgroup_cpu_quota(root):
    """CPUs allowed by the cgroup files under `root` (v2, then v1), or None."""
    text = _read(os.path.join(root, "cpu.max"))
    if text is not None:
        fields = text.split()
        if len(fields) == 2 and fields[0] != "max":
            return _ratio(fields[0], fields[1])
        return None
    for folder in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota = _read(os.path.join(root, folder, "cpu.cfs_quota_us"))
        period = _read(os.path.join(root, folder, "cpu.cfs_period_us"))
        if quota is not None and period is not None:
            return _ratio(quota, period)
    return None


def _ratio(quota, period):
    try:
        quota, period = int(quota), int(period)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path):
    try:
        with open(path, encoding="ascii") as file:
            return file.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def block_bounds(rows, flops_per_row, threads):
    """[(r0, r1), ...]: blocks of at least MIN_ROWS_PER_BLOCK rows (a multiple of 8,
    the row tile), BLOCKS_PER_THREAD per thread where the rows allow, none with
    less than MIN_FLOPS_PER_BLOCK of work; no blocks for no rows."""
    wanted = max(1, min(threads * BLOCKS_PER_THREAD, rows * flops_per_row // MIN_FLOPS_PER_BLOCK))
    size = max(MIN_ROWS_PER_BLOCK, -(-rows // wanted))
    size = -(-size // MIN_ROWS_PER_BLOCK) * MIN_ROWS_PER_BLOCK
    return [(r0, min(r0 + size, rows)) for r0 in range(0, rows, size)]


def run_blocks(kernel, arguments, rows, flops_per_row, bounds=None):
    """Calls `kernel(r0, r1, *arguments)` for every block of `rows` batch rows: those of
    `block_bounds`, or `bounds` from a call to it (for a caller that sizes
    something per block)."""
    if rows <= 0:
        return
    threads = thread_count()
    if bounds is None:
        bounds = block_bounds(rows, flops_per_row, threads)
    if len(bounds) == 1 or threads == 1:
        for r0, r1 in bounds:
            kernel(r0, r1, *arguments)
        return
    blocks = _Blocks(kernel, arguments, bounds)
    pool = _shared_pool(threads - 1)
    for _ in range(min(threads, len(bounds)) - 1):
        try:
            pool.submit(blocks.work)
        except RuntimeError:  # replaced by another call's count meanwhile: run here
            break
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
    """The process's pool, with exactly `workers` threads at most (rebuilt when it differs).

    A replaced pool finishes what it was given and its threads then exit.
    """
    global _pool, _pool_workers
    workers = max(1, workers)
    with _pool_lock:
        if _pool is None or _pool_workers != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="fusedlstm")
            _pool_workers = workers
        return _pool


def _forget_pool_after_fork():
    """In a forked child: the parent's pool has no threads here, and its lock may be held."""
    global _pool, _pool_workers, _pool_lock
    _pool, _pool_workers, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forget_pool_after_fork)
