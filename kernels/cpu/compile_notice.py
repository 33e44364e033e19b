"""One line on stderr the first time this process compiles the kernels.

Numba compiles a kernel the first time it runs with a new activation pair and
keeps the machine code in its on-disk cache; loading it from there is quick and
says nothing. A real compile takes seconds, so the user is told what is being
compiled, why, and where it will be cached. Most compiles run in a background
thread (`kernels.cpu`'s dispatcher, inside `in_background`) while the layer
runs its NumPy implementation: then the notice says so, and that nobody waits.
"""

import contextlib
import sys
import threading

from numba.core import event

from ..gates import ACTIVATION_CODES

_NAMES = {code: name for name, code in ACTIVATION_CODES.items()}
_announced = threading.Event()
_thread = threading.local()


class _Announcer(event.Listener):
    def __init__(self, message):
        self._message = message

    def on_start(self, ev):
        if not _announced.is_set():
            _announced.set()
            print(self._message, file=sys.stderr, flush=True)

    def on_end(self, ev):
        pass


@contextlib.contextmanager
def in_background():
    """Marks the compiles this thread starts inside the block as background ones."""
    _thread.background = True
    try:
        yield
    finally:
        _thread.background = False


@contextlib.contextmanager
def on_first_compile(direction, activation, recurrent_activation, dispatcher):
    """Announces, once per process, a compile that starts inside the block.

    Args:
        direction: what is compiled, e.g. "forward".
        activation, recurrent_activation: the codes it is compiled for.
        dispatcher: the Numba dispatcher, whose cache location is named.
    """
    if _announced.is_set():
        yield
        return
    cache_path = dispatcher.stats.cache_path
    pair = (f"activation={_NAMES[activation]!r}, "
            f"recurrent_activation={_NAMES[recurrent_activation]!r}")
    if getattr(_thread, "background", False):
        message = (
            f"fusedlstm: compiling the CPU kernels for {pair} in a background thread (first "
            f"use on this machine, a few seconds; cached in {cache_path}). Until they are "
            "ready the layer runs a slower NumPy implementation of the same math. "
            "`python -m fusedlstm compile` does this ahead of time.")
    else:
        message = (
            f"fusedlstm: compiling the CPU {direction} kernel for {pair} (first use on this "
            f"machine, a few seconds; cached in {cache_path}). "
            "`python -m fusedlstm compile` does this ahead of time.")
    with event.install_listener("numba:compile", _Announcer(message)):
        yield
