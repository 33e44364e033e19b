"""The CPU kernels: `njit` step kernels, the register tile, thread blocks, host drivers.

- `steps`: the whole layer, forward and backward, over a block of batch rows:
  the input projection, the recurrence, the input and weight gradients.
- `panels`, `tile`: the weights packed in panels and the register tiles that
  multiply a block of rows by them (or add such products up).
- `threads`: blocks of rows handed to a few threads.
- `drivers`: the kernels' host drivers on NumPy arrays, `warm_up`, `aligned_empty`.
- `fallback`: the same `forward` and `backward` in NumPy.

`forward` and `backward` here run the whole layer (x and the weights in, the
outputs and every gradient out; see `fallback`) on the compiled kernels of
their activation pair when those are ready. Until then (first use on a
machine: seconds of compile, or a fraction of a second to load them from
Numba's disk cache) they run `fallback`, and the first call starts a daemon
thread that compiles or loads the pair's kernels (`warm_up`). The choice is
made on every call, so an op traced into a graph before the kernels were
ready switches to them as soon as they are.

`FUSEDLSTM_COMPILE=foreground` makes every call run the kernels, compiling
them in the calling thread if need be (tests, benchmarks); `wait_for_kernels`
waits for one pair's. A compile that fails in the thread leaves the pair on
`fallback` and warns once; `python -m fusedlstm compile` (`warm_up` in the
foreground) raises the error itself. A forked child does not inherit a
compile under way: its first call starts its own.
"""

import collections
import os
import threading
import warnings

from . import compile_notice, fallback
from .drivers import aligned_empty, warm_up
from .drivers import backward as _kernel_backward
from .drivers import forward as _kernel_forward

COMPILE_ENV = "FUSEDLSTM_COMPILE"
COMPILE_CHOICES = ("background", "foreground")

# How many calls ran each implementation: keys ("kernels" or "fallback",
# "forward" or "backward"). Tests read it to see which path ran.
calls = collections.Counter()

__all__ = ["COMPILE_ENV", "aligned_empty", "backward", "calls", "forward", "kernels_ready",
           "wait_for_kernels", "warm_up"]


class _Compile:
    """One activation pair's background compile: its thread, and how it ended."""

    def __init__(self, pair):
        self.done = threading.Event()
        self.error = None
        self.warned = False
        self.thread = threading.Thread(target=self._run, args=pair, daemon=True,
                                       name=f"fusedlstm-compile-{pair[0]}-{pair[1]}")

    def _run(self, activation, recurrent_activation):
        try:
            with compile_notice.in_background():
                warm_up(activation, recurrent_activation, training=True)
        except BaseException as error:  # noqa: BLE001 -- reported by the calling thread
            self.error = error
        finally:
            self.done.set()

    @property
    def ready(self):
        return self.done.is_set() and self.error is None


_compiles = {}
_lock = threading.Lock()


def forward(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask, recurrent_mask,
            activation, recurrent_activation, zero_output_for_mask, training, out=None):
    """The layer's forward pass, on the kernels when ready; see `fallback.forward`."""
    on_kernels = kernels_ready(activation, recurrent_activation)
    calls["kernels" if on_kernels else "fallback", "forward"] += 1
    implementation = _kernel_forward if on_kernels else fallback.forward
    return implementation(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask,
                          recurrent_mask, activation, recurrent_activation,
                          zero_output_for_mask, training, out=out)


def backward(x, kernel, recurrent_kernel, mask, input_mask, recurrent_mask, activation,
             recurrent_activation, zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n,
             out=None):
    """The layer's backward pass, on the kernels when ready; see `fallback.backward`.

    `saved` may come from either implementation's forward: they save the same.
    """
    on_kernels = kernels_ready(activation, recurrent_activation)
    calls["kernels" if on_kernels else "fallback", "backward"] += 1
    implementation = _kernel_backward if on_kernels else fallback.backward
    return implementation(x, kernel, recurrent_kernel, mask, input_mask, recurrent_mask,
                          activation, recurrent_activation, zero_output_for_mask, saved,
                          d_outputs, d_h_n, d_c_n, out=out)


def kernels_ready(activation, recurrent_activation):
    """Whether calls of this activation pair run the compiled kernels now.

    Starts the pair's background compile on its first call. Always True with
    `FUSEDLSTM_COMPILE=foreground`.

    Raises:
        ValueError: `FUSEDLSTM_COMPILE` is not one of `COMPILE_CHOICES`.
    """
    pair = (int(activation), int(recurrent_activation))
    compile_ = _compiles.get(pair)
    if compile_ is not None and compile_.ready:
        return True
    if _compile_in_foreground():
        return True
    if compile_ is None:
        compile_ = _start(pair)
    elif compile_.error is not None and not compile_.warned:
        compile_.warned = True
        warnings.warn(
            f"fusedlstm: the CPU kernels for activation codes {pair} failed to compile, so the "
            f"layer keeps running its slower NumPy implementation: "
            f"{type(compile_.error).__name__}: {compile_.error}. `python -m fusedlstm compile` "
            "shows the whole error.", RuntimeWarning, stacklevel=3)
    return compile_.ready


def wait_for_kernels(activation, recurrent_activation, timeout=None):
    """Waits until calls of this activation pair run the compiled kernels.

    Starts the pair's background compile if no call has yet.

    Returns:
        Whether they are ready (False: `timeout` seconds passed first).

    Raises:
        The compile's own error, when it failed.
    """
    pair = (int(activation), int(recurrent_activation))
    compile_ = _compiles.get(pair) or _start(pair)
    compile_.done.wait(timeout)
    if compile_.error is not None:
        raise compile_.error
    return compile_.ready


def _start(pair):
    """The pair's compile, started by this call unless another call started it first."""
    with _lock:
        compile_ = _compiles.get(pair)
        if compile_ is None:
            compile_ = _compiles[pair] = _Compile(pair)
            compile_.thread.start()
    return compile_


def _compile_in_foreground():
    choice = os.environ.get(COMPILE_ENV, "background")
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"{COMPILE_ENV} must be one of {', '.join(COMPILE_CHOICES)}. "
                         f"Received: {choice!r}")
    return choice == "foreground"


def _forget_unfinished_compiles():
    """In a forked child: the parent's compile threads do not exist here."""
    global _lock
    _lock = threading.Lock()
    for pair in [p for p, c in _compiles.items() if not c.done.is_set()]:
        del _compiles[pair]


os.register_at_fork(after_in_child=_forget_unfinished_compiles)
