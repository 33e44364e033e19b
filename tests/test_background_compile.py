"""No user waits for a compile: the NumPy fallback, and the switch to the kernels.

`kernels.cpu.forward`/`backward` run `kernels.cpu.fallback` until the compiled
kernels of their activation pair are ready, compiling them in a daemon thread
meanwhile. Checked here: the fallback against the float64 reference and the
kernels (tolerances from `parity`'s error model); an op traced before the
kernels were ready switches to them without a retrace (the dispatcher's
`calls` counter says which path ran); a failed compile keeps the fallback
with one warning; a forked child; the notice of a background compile.

Each test holds the compile thread at a gate (a `warm_up` that waits for an
event) where it needs the fallback to run, so no outcome depends on timing.
"""

import os
import subprocess
import sys
import threading
import warnings

import keras
import numpy as np
import pytest

import fusedlstm
from fusedlstm.cli import precompile
from fusedlstm.kernels import cpu
from fusedlstm.kernels.cpu import fallback
from fusedlstm.kernels.gates import ACTIVATION_CODES, SIGMOID, TANH
from fusedlstm.testing import reference
from parity import float32_rounding_allowance, summed_terms

NAMES = {code: name for name, code in ACTIVATION_CODES.items()}
RESULT_NAMES = ("outputs", "h_n", "c_n", "grad x", "grad kernel", "grad recurrent_kernel",
                "grad bias", "grad h0", "grad c0")

# name: (activation, recurrent_activation, zero_output_for_mask, mask, input and
# recurrent dropout)
CASES = {
    "plain": ("tanh", "sigmoid", False, False, False),
    "masked": ("tanh", "sigmoid", False, True, False),
    "masked_zero_output": ("tanh", "sigmoid", True, True, False),
    "dropouts_masked": ("tanh", "sigmoid", False, True, True),
    "softsign_hard_sigmoid": ("softsign", "hard_sigmoid", False, True, True),
    "relu_sigmoid": ("relu", "sigmoid", False, False, False),
    "linear_tanh": ("linear", "tanh", True, True, False),
}
SIZES = [(1, 1, 1, 1), (5, 7, 4, 3), (6, 9, 13, 31)]


def problem(case, size, seed=0):
    """The whole-layer arguments and output gradients of one case, float32."""
    act, ract, zero_output, masked, dropout = CASES[case]
    N, T, C, H = size
    rng = np.random.default_rng(seed)

    def f32(a):
        return np.ascontiguousarray(a, np.float32)

    mask = None
    if masked:
        mask = rng.random((N, T)) > 0.3
        mask[-1:] = False  # a fully masked row (none when N=0)
    input_mask = recurrent_mask = None
    if dropout:
        input_mask = f32((rng.random((4, N, C)) > 0.3) / 0.7)
        recurrent_mask = f32((rng.random((4, N, H)) > 0.4) / 0.6)
    return {
        "x": f32(rng.standard_normal((N, T, C))),
        "kernel": f32(rng.normal(0, 0.6 / np.sqrt(C), (C, 4 * H))),
        "bias": f32(rng.normal(0, 0.5, 4 * H)),
        "recurrent_kernel": f32(rng.normal(0, 0.6 / np.sqrt(H), (H, 4 * H))),
        "h0": f32(rng.standard_normal((N, H))), "c0": f32(rng.standard_normal((N, H))),
        "mask": mask, "input_mask": input_mask, "recurrent_mask": recurrent_mask,
        "codes": (ACTIVATION_CODES[act], ACTIVATION_CODES[ract], zero_output),
        "d_outputs": f32(rng.standard_normal((N, T, H))),
        "d_h_n": f32(rng.standard_normal((N, H))), "d_c_n": f32(rng.standard_normal((N, H))),
    }


def run(forward, backward, p):
    """The nine results of one forward and backward pass of `forward`/`backward`."""
    outputs, h_n, c_n, saved = forward(
        p["x"], p["kernel"], p["bias"], p["recurrent_kernel"], p["h0"], p["c0"], p["mask"],
        p["input_mask"], p["recurrent_mask"], *p["codes"], True)
    grads = backward(p["x"], p["kernel"], p["recurrent_kernel"], p["mask"], p["input_mask"],
                     p["recurrent_mask"], *p["codes"], saved, p["d_outputs"], p["d_h_n"],
                     p["d_c_n"])
    return (outputs, h_n, c_n, *grads)


def run_reference(p):
    act, ract, zero_output = p["codes"]
    seq, h, c, tape = reference.lstm_forward(
        p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], p["h0"], p["c0"], p["mask"],
        p["recurrent_mask"], p["input_mask"], NAMES[act], NAMES[ract], False, zero_output)
    grads = reference.lstm_backward(tape, p["d_outputs"], p["d_h_n"], p["d_c_n"], NAMES[act],
                                    NAMES[ract], zero_output)
    return (seq, h, c, *(grads[k] for k in ("x", "kernel", "recurrent_kernel", "bias", "h0",
                                            "c0")))


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fallback_matches_the_float64_reference_and_the_kernels(case, size):
    p = problem(case, size)
    got = run(fallback.forward, fallback.backward, p)
    kernels = run(cpu._kernel_forward, cpu._kernel_backward, p)
    for name, value, on_kernels, ref in zip(RESULT_NAMES, got, kernels, run_reference(p)):
        assert value.dtype == np.float32 and value.shape == ref.shape, name
        rounding = float32_rounding_allowance(ref, summed_terms(name, size))
        assert np.abs(value - ref).max(initial=0) <= rounding, (
            f"{name}: fallback vs float64 {np.abs(value - ref).max():.3g} > {rounding:.3g}")
        # Each may err by the allowance, in opposite directions.
        assert np.abs(value - on_kernels).max(initial=0) <= 2 * rounding, (
            f"{name}: fallback vs kernels {np.abs(value - on_kernels).max():.3g}")


def test_fallback_finds_a_wrong_gate():
    """The bound above is tight enough to fail: a kernel whose forget-gate columns
    are swapped with the input gate's moves the outputs far beyond it."""
    p = problem("plain", (5, 7, 4, 3))
    H = 3
    wrong = dict(p, kernel=np.ascontiguousarray(np.roll(p["kernel"], H, axis=1)))
    ref = run_reference(p)[0]
    outputs = run(fallback.forward, fallback.backward, wrong)[0]
    assert np.abs(outputs - ref).max() > 100 * float32_rounding_allowance(
        ref, summed_terms("outputs", (5, 7, 4, 3)))


@pytest.mark.parametrize("size", [(0, 4, 3, 2), (3, 0, 3, 2)], ids=["N=0", "T=0"])
def test_fallback_empty_batch_or_sequence_matches_the_kernels(size):
    p = problem("masked", size)
    got = run(fallback.forward, fallback.backward, p)
    want = run(cpu._kernel_forward, cpu._kernel_backward, p)
    for name, value, expected in zip(RESULT_NAMES, got, want):
        assert value.shape == expected.shape, name
        np.testing.assert_array_equal(value, expected, err_msg=name)
    if size[1] == 0:
        np.testing.assert_array_equal(got[1], p["h0"])
        np.testing.assert_array_equal(got[7], p["d_h_n"])


def test_fallback_writes_into_out_and_checks_it():
    p = problem("dropouts_masked", (5, 7, 4, 3))
    args = (p["x"], p["kernel"], p["bias"], p["recurrent_kernel"], p["h0"], p["c0"],
            p["mask"], p["input_mask"], p["recurrent_mask"], *p["codes"])
    want = fallback.forward(*args, True)
    out = [np.empty_like(a) for a in want[:3] + tuple(want[3])]
    got = fallback.forward(*args, True, out=out)
    assert all(a is b for a, b in zip(got[:3] + tuple(got[3]), out))
    for a, b in zip(out, want[:3] + tuple(want[3])):
        np.testing.assert_array_equal(a, b)
    grads = fallback.backward(p["x"], p["kernel"], p["recurrent_kernel"], p["mask"],
                              p["input_mask"], p["recurrent_mask"], *p["codes"], want[3],
                              p["d_outputs"], p["d_h_n"], p["d_c_n"])
    grad_out = [np.empty_like(g) for g in grads]
    got_grads = fallback.backward(p["x"], p["kernel"], p["recurrent_kernel"], p["mask"],
                                  p["input_mask"], p["recurrent_mask"], *p["codes"], want[3],
                                  p["d_outputs"], p["d_h_n"], p["d_c_n"], out=grad_out)
    assert all(a is b for a, b in zip(got_grads, grad_out))
    for a, b in zip(grad_out, grads):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"shape \(5, 7, 3\) to write a result into"):
        fallback.forward(*args, False, out=[np.empty((5, 7, 4), np.float32)])


def test_fallback_raises_the_kernels_value_errors():
    p = problem("masked", (5, 7, 4, 3))
    with pytest.raises(ValueError, match=r"`kernel` of shape \[C, 4H\] = \(4, 12\)"):
        fallback.forward(p["x"], p["kernel"][1:], p["bias"], p["recurrent_kernel"], p["h0"],
                         p["c0"], None, None, None, TANH, SIGMOID, False, False)
    with pytest.raises(ValueError, match="`mask` of shape"):
        fallback.forward(p["x"], p["kernel"], p["bias"], p["recurrent_kernel"], p["h0"],
                         p["c0"], p["mask"][:, 1:], None, None, TANH, SIGMOID, False, False)


class GatedCompiles:
    """A fresh dispatcher state whose compile threads wait at a gate, or fail."""

    def __init__(self, monkeypatch, error=None):
        self.gate = threading.Event()
        self.started = []
        real = cpu.warm_up

        def gated_warm_up(*args, **kwargs):
            self.started.append(args)
            self.gate.wait()
            if error is not None:
                raise error
            return real(*args, **kwargs)

        monkeypatch.setenv(cpu.COMPILE_ENV, "background")
        monkeypatch.setattr(cpu, "_compiles", {})
        monkeypatch.setattr(cpu, "warm_up", gated_warm_up)

    def release(self):
        self.gate.set()


def calls_since(before):
    return {key: count - before.get(key, 0) for key, count in cpu.calls.items()
            if count != before.get(key, 0)}


def test_dispatcher_runs_the_fallback_until_the_kernels_are_ready(monkeypatch):
    compiles = GatedCompiles(monkeypatch)
    p = problem("dropouts_masked", (5, 7, 4, 3))
    before = dict(cpu.calls)
    first = run(cpu.forward, cpu.backward, p)
    assert calls_since(before) == {("fallback", "forward"): 1, ("fallback", "backward"): 1}
    run(cpu.forward, cpu.backward, p)
    assert compiles.started == [(TANH, SIGMOID)]  # one thread, started by the first call
    compiles.release()
    assert cpu.wait_for_kernels(TANH, SIGMOID, timeout=600)
    before = dict(cpu.calls)
    second = run(cpu.forward, cpu.backward, p)
    assert calls_since(before) == {("kernels", "forward"): 1, ("kernels", "backward"): 1}
    for name, a, b, ref in zip(RESULT_NAMES, first, second, run_reference(p)):
        assert np.abs(a - b).max() <= 2 * float32_rounding_allowance(
            ref, summed_terms(name, (5, 7, 4, 3))), name


def test_kernels_take_the_saved_state_of_a_fallback_forward(monkeypatch):
    """A forward pass on the fallback and its backward pass on the kernels (the
    compile ended in between) give the kernels' gradients."""
    compiles = GatedCompiles(monkeypatch)
    p = problem("masked", (5, 7, 4, 3))
    args = (p["x"], p["kernel"], p["bias"], p["recurrent_kernel"], p["h0"], p["c0"],
            p["mask"], None, None, *p["codes"])
    saved = cpu.forward(*args, True)[3]
    compiles.release()
    cpu.wait_for_kernels(TANH, SIGMOID, timeout=600)
    before = dict(cpu.calls)
    grads = cpu.backward(p["x"], p["kernel"], p["recurrent_kernel"], p["mask"], None, None,
                         *p["codes"], saved, p["d_outputs"], p["d_h_n"], p["d_c_n"])
    assert calls_since(before) == {("kernels", "backward"): 1}
    want = run(fallback.forward, fallback.backward, p)[3:]
    for name, a, b in zip(RESULT_NAMES[3:], grads, want):
        assert np.abs(a - b).max() <= 2 * float32_rounding_allowance(
            b, summed_terms(name, (5, 7, 4, 3))), name


def test_a_failed_compile_keeps_the_fallback_and_warns_once(monkeypatch):
    compiles = GatedCompiles(monkeypatch, error=RuntimeError("LLVM ran out of registers"))
    p = problem("plain", (2, 3, 4, 3))
    want = run(fallback.forward, fallback.backward, p)
    compiles.release()
    with pytest.raises(RuntimeError, match="out of registers"):
        cpu.wait_for_kernels(TANH, SIGMOID, timeout=600)
    before = dict(cpu.calls)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            got = run(cpu.forward, cpu.backward, p)
    assert calls_since(before) == {("fallback", "forward"): 3, ("fallback", "backward"): 3}
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "LLVM ran out of registers" in messages[0], messages
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_precompile_raises_the_compile_error(monkeypatch):
    def failing_warm_up(*args, **kwargs):
        raise RuntimeError("LLVM ran out of registers")

    monkeypatch.setattr(cpu, "warm_up", failing_warm_up)
    with pytest.raises(RuntimeError, match="out of registers"):
        precompile.compile_kernels([("tanh", "sigmoid")], report=lambda line: None)


def test_foreground_runs_the_kernels_at_once(monkeypatch):
    monkeypatch.setenv(cpu.COMPILE_ENV, "foreground")
    monkeypatch.setattr(cpu, "_compiles", {})
    before = dict(cpu.calls)
    run(cpu.forward, cpu.backward, problem("plain", (2, 3, 4, 3)))
    assert calls_since(before) == {("kernels", "forward"): 1, ("kernels", "backward"): 1}
    assert cpu._compiles == {}


def test_an_unknown_compile_choice_raises(monkeypatch):
    monkeypatch.setenv(cpu.COMPILE_ENV, "eventually")
    monkeypatch.setattr(cpu, "_compiles", {})
    with pytest.raises(ValueError, match="FUSEDLSTM_COMPILE must be one of background, "
                                         "foreground. Received: 'eventually'"):
        run(cpu.forward, cpu.backward, problem("plain", (2, 3, 4, 3)))


def model_and_data():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((7, 4)),
                              fusedlstm.LSTM(3, return_sequences=True, use_fused=True)])
    x = np.random.default_rng(0).standard_normal((5, 7, 4)).astype("float32")
    return model, x


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.function")
def test_a_tf_function_traced_on_the_fallback_switches_to_the_kernels(monkeypatch):
    import tensorflow as tf

    compiles = GatedCompiles(monkeypatch)
    model, x = model_and_data()

    @tf.function
    def loss_and_grads(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sin(model(x, training=True)))
        return loss, tape.gradient(loss, model.trainable_variables)

    before = dict(cpu.calls)
    first = loss_and_grads(x)
    assert calls_since(before) == {("fallback", "forward"): 1, ("fallback", "backward"): 1}
    compiles.release()
    cpu.wait_for_kernels(TANH, SIGMOID, timeout=600)
    before = dict(cpu.calls)
    second = loss_and_grads(x)
    assert calls_since(before) == {("kernels", "forward"): 1, ("kernels", "backward"): 1}
    assert loss_and_grads.experimental_get_tracing_count() == 1
    assert_close(first, second)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="jax.jit")
def test_a_jitted_function_traced_on_the_fallback_switches_to_the_kernels(monkeypatch):
    import jax

    compiles = GatedCompiles(monkeypatch)
    model, x = model_and_data()
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def loss_and_grads(trainable, x):
        def loss(trainable):
            outputs, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            return jax.numpy.sum(jax.numpy.sin(outputs))
        return jax.value_and_grad(loss)(trainable)

    before = dict(cpu.calls)
    first = jax.block_until_ready(loss_and_grads(trainable, x))
    assert calls_since(before) == {("fallback", "forward"): 1, ("fallback", "backward"): 1}
    compiles.release()
    cpu.wait_for_kernels(TANH, SIGMOID, timeout=600)
    before = dict(cpu.calls)
    second = jax.block_until_ready(loss_and_grads(trainable, x))
    assert calls_since(before) == {("kernels", "forward"): 1, ("kernels", "backward"): 1}
    assert loss_and_grads._cache_size() == 1
    assert_close(first, second)


def test_fit_switches_to_the_kernels_between_steps(monkeypatch):
    """Keras's compiled train function (a tf.function, a jax.jit, or torch eager)."""
    compiles = GatedCompiles(monkeypatch)
    model, x = model_and_data()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    y = np.zeros((5, 7, 3), np.float32)
    before = dict(cpu.calls)
    model.fit(x, y, epochs=1, verbose=0)
    assert calls_since(before) == {("fallback", "forward"): 1, ("fallback", "backward"): 1}
    compiles.release()
    cpu.wait_for_kernels(TANH, SIGMOID, timeout=600)
    before = dict(cpu.calls)
    model.fit(x, y, epochs=1, verbose=0)
    assert calls_since(before) == {("kernels", "forward"): 1, ("kernels", "backward"): 1}


def assert_close(first, second):
    """Two runs of `model_and_data`'s loss and gradients, fallback then kernels: each
    within the deepest sum's rounding (a weight gradient's, plus the loss's N*T*H terms)."""
    terms = summed_terms("grad kernel", (5, 7, 4, 3)) + 5 * 7 * 3
    for a, b in zip(keras.tree.flatten(first), keras.tree.flatten(second)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 2 * float32_rounding_allowance(a, terms)


_SUBPROCESS_ENV = dict(os.environ, KERAS_BACKEND="numpy", PYTHONPATH=os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
     os.path.dirname(os.path.abspath(__file__))]), FUSEDLSTM_COMPILE="background")

_FORK_SCRIPT = """
import os, threading
import numpy as np
from fusedlstm.kernels import cpu
from test_background_compile import problem, run

gate = threading.Event()
real = cpu.warm_up
cpu.warm_up = lambda *a, **k: (gate.wait(), real(*a, **k))[1]
p = problem("masked", (5, 7, 4, 3))
want = run(cpu.forward, cpu.backward, p)  # the fallback; the compile waits at the gate
assert cpu.calls[("fallback", "forward")] == 1 and not cpu.kernels_ready(0, 1)
pid = os.fork()
if pid == 0:
    ok = cpu._compiles == {}  # no compile under way in the child
    got = run(cpu.forward, cpu.backward, p)  # the fallback again; a compile of its own starts
    ok = ok and cpu.calls[("fallback", "forward")] == 2 and len(cpu._compiles) == 1
    ok = ok and all(np.array_equal(a, b) for a, b in zip(got, want))
    gate.set()
    ok = ok and cpu.wait_for_kernels(0, 1, timeout=600)
    run(cpu.forward, cpu.backward, p)
    ok = ok and cpu.calls[("kernels", "forward")] == 1
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, "child failed"
gate.set()
assert cpu.wait_for_kernels(0, 1, timeout=600)
run(cpu.forward, cpu.backward, p)
assert cpu.calls[("kernels", "forward")] == 1
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_starts_its_own_compile():
    result = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True,
                            text=True, timeout=600, env=_SUBPROCESS_ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.split()[-1] == "ok"


_FIRST_USE_SCRIPT = """
import numpy as np
from fusedlstm.kernels import cpu
from test_background_compile import problem, run

p = problem("plain", (2, 3, 4, 3))
run(cpu.forward, cpu.backward, p)
first = dict(cpu.calls)
assert cpu.wait_for_kernels(0, 1, timeout=600)
run(cpu.forward, cpu.backward, p)
print(sorted(first.items()), sorted(cpu.calls.items()))
"""


def test_first_use_with_an_empty_cache_compiles_in_the_background(tmp_path):
    """A fresh process with an empty kernel cache: the first call returns at once
    from the fallback; the notice says the compile runs in the background."""
    result = subprocess.run([sys.executable, "-c", _FIRST_USE_SCRIPT], capture_output=True,
                            text=True, timeout=600,
                            env=dict(_SUBPROCESS_ENV, NUMBA_CACHE_DIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == (
        "[(('fallback', 'backward'), 1), (('fallback', 'forward'), 1)] "
        "[(('fallback', 'backward'), 1), (('fallback', 'forward'), 1), "
        "(('kernels', 'backward'), 1), (('kernels', 'forward'), 1)]")
    notices = [line for line in result.stderr.splitlines()
               if line.startswith("fusedlstm: compiling")]
    assert len(notices) == 1, result.stderr[-2000:]
    assert "in a background thread" in notices[0] and str(tmp_path) in notices[0]
