"""`python -m fusedlstm compile`: fills Numba's disk cache with the CPU kernels ahead of time.

The first call of a layer in a process compiles its kernels (seconds) or loads
them from Numba's on-disk cache (a fraction of a second). Compiling them once
when a container image is built, or before a job starts, takes that delay out
of the first training step.
"""

import itertools
import time

from fusedlstm.kernels import cpu
from fusedlstm.kernels.gates import ACTIVATION_CODES

DEFAULT_PAIR = ("tanh", "sigmoid")


def activation_pairs(activation, recurrent_activation, every_pair):
    """The `(activation, recurrent_activation)` names to compile."""
    if every_pair:
        return list(itertools.product(sorted(ACTIVATION_CODES), repeat=2))
    return [(activation, recurrent_activation)]


def compile_kernels(pairs, training=True, report=print):
    """Compiles or loads the kernels of each pair, reporting one line each.

    Returns:
        The directory Numba caches them in.
    """
    cache_path = None
    for activation, recurrent_activation in pairs:
        start = time.perf_counter()
        compiled, cache_path = cpu.warm_up(ACTIVATION_CODES[activation],
                                           ACTIVATION_CODES[recurrent_activation], training)
        seconds = time.perf_counter() - start
        what = "forward and backward kernels" if training else "forward kernel"
        how = "compiled" if compiled else "loaded from the cache"
        report(f"  {activation} / {recurrent_activation}: {what} {how} in {seconds:.1f} s")
    return cache_path
