"""The CPU drivers never hang, crash or read past a buffer: shape checks, empty
batches and sequences, thread counts on every platform, fork, concurrent calls."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from fusedlstm.kernels import checks
from fusedlstm.kernels.cpu import drivers
from fusedlstm.kernels.cpu import threads
from fusedlstm.kernels.gates import SIGMOID, TANH

BACKEND_INDEPENDENT = True  # see conftest.py

N, T, H = 5, 4, 3
# Enough work for two blocks of 16 rows (`threads.block_bounds`), so two threads share it.
BIG = (32, 16, 64)


def problem(n=N, t=T, h=H, seed=0):
    rng = np.random.default_rng(seed)
    return {"xw": rng.standard_normal((n, t, 4 * h)).astype("float32"),
            "recurrent_kernel": rng.normal(0, 0.3, (h, 4 * h)).astype("float32"),
            "h0": rng.standard_normal((n, h)).astype("float32"),
            "c0": rng.standard_normal((n, h)).astype("float32"),
            "mask": rng.random((n, t)) > 0.3,
            "recurrent_mask": (rng.random((4, n, h)) > 0.3).astype("float32")}


def forward(p, training=False):
    return drivers.forward(p["xw"], p["recurrent_kernel"], p["h0"], p["c0"], p["mask"],
                       p["recurrent_mask"], TANH, SIGMOID, False, training)


@pytest.fixture
def fresh_threads(monkeypatch):
    """`threads` with nothing parsed, read or overridden yet (restored afterwards)."""
    unset = getattr(threads, "_UNSET", None)
    for name, value in (("_requested", unset), ("_quota", unset), ("_override", None)):
        monkeypatch.setattr(threads, name, value, raising=False)
    monkeypatch.delenv("FUSEDLSTM_NUM_THREADS", raising=False)


@pytest.fixture
def two_threads(monkeypatch):
    """Every call runs on two threads, whatever this machine has."""
    monkeypatch.setattr(threads, "thread_count", lambda: 2)


def bad(value):
    return lambda a: value


# name: (argument, how to spoil it, what the error says)
BAD_FORWARD = {
    "xw_rank": ("xw", lambda a: a[0], r"`xw` of shape \[N, T, 4H\].*Received: xw.shape=\(4, 12\)"),
    "xw_not_4h": ("xw", lambda a: a[..., :-1], r"`xw`.*Received: xw.shape=\(5, 4, 11\)"),
    "kernel_units": ("recurrent_kernel", bad(np.zeros((4, 12), "float32")),
                     r"`recurrent_kernel` of shape \[H, 4H\] = \(3, 12\).*Received: "
                     r"recurrent_kernel.shape=\(4, 12\)"),
    "h0_rows": ("h0", lambda a: a[:-1], r"`h0` of shape \[N, H\] = \(5, 3\).*\(4, 3\)"),
    "c0_units": ("c0", bad(np.zeros((5, 4), "float32")), r"`c0`.*= \(5, 3\).*\(5, 4\)"),
    "mask_rows": ("mask", lambda a: a[:-1], r"`mask` of shape \[N, T\] = \(5, 4\).*\(4, 4\)"),
    "mask_short": ("mask", lambda a: a[:, :-1], r"`mask`.*= \(5, 4\).*\(5, 3\)"),
    "mask_dtype": ("mask", lambda a: a.astype("float32"), r"`mask` of dtype bool.*float32"),
    "recurrent_mask_rows": ("recurrent_mask", lambda a: a[:, :-1],
                            r"`recurrent_mask` of shape \[4, N, H\] = \(4, 5, 3\).*\(4, 4, 3\)"),
    "h0_dtype": ("h0", lambda a: a.astype("float64"), r"`h0` of dtype float32.*float64"),
    "h0_strided": ("h0", lambda a: np.repeat(a, 2, axis=1)[:, ::2],
                   r"`h0` to be C-contiguous.*strides"),
    "xw_fortran": ("xw", np.asfortranarray, r"`xw` to be C-contiguous"),
}


@pytest.mark.parametrize("case", sorted(BAD_FORWARD))
def test_forward_names_the_bad_input(case):
    name, spoil, message = BAD_FORWARD[case]
    p = problem()
    p[name] = spoil(p[name])
    with pytest.raises(ValueError, match=message):
        forward(p)


BAD_BACKWARD = {
    "d_outputs_rank": (5, lambda a: a[0], r"`d_outputs` of shape \[N, T, H\]"),
    "d_h_n_rows": (6, lambda a: a[:-1], r"`d_h_n` of shape \[N, H\] = \(5, 3\).*\(4, 3\)"),
    "d_c_n_dtype": (7, lambda a: a.astype("float64"), r"`d_c_n` of dtype float32"),
    "c_seq_steps": ("c_seq", lambda a: a[:, :-1], r"`saved c_seq` of shape \[N, T\+1, H\] = "
                                                   r"\(5, 5, 3\).*\(5, 4, 3\)"),
    "gates_rows": ("gates", lambda a: a[:-1], r"`saved gates`.*\(5, 4, 12\).*\(4, 4, 12\)"),
    "mask_rows": (1, lambda a: a[:-1], r"`mask`.*\(5, 4\).*\(4, 4\)"),
    "kernel_units": (0, lambda a: a[:, :-4], r"`recurrent_kernel`.*\(3, 12\).*\(3, 8\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_BACKWARD))
def test_backward_names_the_bad_input(case):
    p = problem()
    outputs, h_n, c_n, saved = forward(p, training=True)
    args = [p["recurrent_kernel"], p["mask"], p["recurrent_mask"], TANH, SIGMOID, False,
            saved, outputs, h_n, c_n]
    where, spoil, message = BAD_BACKWARD[case]
    if isinstance(where, str):
        saved = list(saved)
        index = {"h_in": 0, "c_seq": 1, "gates": 2}[where]
        saved[index] = spoil(saved[index])
        args[6] = tuple(saved)
    else:
        args[where if where < 3 else where + 2] = spoil(args[where if where < 3 else where + 2])
    with pytest.raises(ValueError, match=message):
        drivers.backward(*args)


def test_checks_return_the_sequence_shape_and_read_device_style_arrays():
    p = problem()
    assert checks.check_forward(p["xw"], p["recurrent_kernel"], p["h0"], p["c0"], None,
                                None) == (N, T, H)

    class DeviceArray:  # what the CUDA drivers hand over: no NumPy flags
        def __init__(self, array, strides=None):
            self.shape, self.dtype = array.shape, array.dtype
            self.__cuda_array_interface__ = {"shape": array.shape, "typestr": array.dtype.str,
                                             "strides": strides, "data": (0, False),
                                             "version": 3}

    assert checks.check_forward(*(DeviceArray(p[k]) for k in ("xw", "recurrent_kernel",
                                                              "h0", "c0")), None, None) == (N, T, H)
    with pytest.raises(ValueError, match="`h0` to be C-contiguous"):
        checks.check_forward(DeviceArray(p["xw"]), p["recurrent_kernel"],
                             DeviceArray(p["h0"], strides=(4, 20)), p["c0"], None, None)


def run_with_timeout(function, seconds=60):
    """`function()`'s result, failing (not hanging) when it does not return in time."""
    result = []
    worker = threading.Thread(target=lambda: result.append(function()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"did not return within {seconds} s"
    return result[0]


@pytest.mark.parametrize("training", [False, True])
def test_empty_batch_returns_empty_results(training, two_threads):
    p = problem(n=0, t=T)
    outputs, h_n, c_n, saved = run_with_timeout(lambda: forward(p, training))
    assert outputs.shape == (0, T, H) and h_n.shape == c_n.shape == (0, H)
    if training:
        assert [s.shape for s in saved] == [(0, T, H), (0, T + 1, H), (0, T, 4 * H)]
        d_xw, d_h0, d_c0 = run_with_timeout(lambda: drivers.backward(
            p["recurrent_kernel"], p["mask"], p["recurrent_mask"], TANH, SIGMOID, False, saved,
            outputs, h_n, c_n))
        assert d_xw.shape == (0, T, 4 * H) and d_h0.shape == d_c0.shape == (0, H)


def test_run_blocks_with_no_rows_returns(two_threads):
    calls = []
    run_with_timeout(lambda: threads.run_blocks(lambda *a: calls.append(a), (), 0, 1 << 30))
    assert calls == []


def test_empty_sequence_keeps_the_initial_state():
    p = problem(t=0)
    outputs, h_n, c_n, saved = forward(p, training=True)
    assert outputs.shape == (N, 0, H)
    np.testing.assert_array_equal(h_n, p["h0"])
    np.testing.assert_array_equal(c_n, p["c0"])
    np.testing.assert_array_equal(saved[1][:, 0], p["c0"])
    d_h, d_c = np.ones((N, H), "float32"), np.full((N, H), 2, "float32")
    d_xw, d_h0, d_c0 = drivers.backward(p["recurrent_kernel"], p["mask"], p["recurrent_mask"], TANH,
                                    SIGMOID, False, saved, outputs, d_h, d_c)
    assert d_xw.shape == (N, 0, 4 * H)
    np.testing.assert_array_equal(d_h0, d_h)
    np.testing.assert_array_equal(d_c0, d_c)


def test_cpu_count_without_sched_getaffinity(monkeypatch, fresh_threads):
    """macOS and Windows have no `os.sched_getaffinity` (nor, before 3.13,
    `os.process_cpu_count`): the count comes from `os.cpu_count`."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.delattr(os, "process_cpu_count", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.setattr(threads, "_quota", None)
    assert threads.thread_count() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert threads.thread_count() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    p = problem(*BIG)
    want = forward(p)[0]
    monkeypatch.undo()
    monkeypatch.setattr(threads, "thread_count", lambda: 1)
    np.testing.assert_array_equal(want, forward(p)[0])


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3.0),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, None),
    ({}, None),
])
def test_cgroup_cpu_quota(tmp_path, files, quota):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert threads.read_cgroup_cpu_quota(str(tmp_path)) == quota


def test_cgroup_quota_caps_the_cpu_count(monkeypatch, fresh_threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "_quota", 2.5)
    assert threads.thread_count() == 3


@pytest.mark.parametrize("text", ["0", "-2", "two", "1.5", "3 threads"])
def test_bad_thread_count_variable_is_a_clear_error(monkeypatch, fresh_threads, text):
    monkeypatch.setenv(threads.THREADS_ENV, text)
    with pytest.raises(ValueError, match=rf"FUSEDLSTM_NUM_THREADS must be a positive integer"
                                         rf".*Received: FUSEDLSTM_NUM_THREADS='{text}'"):
        forward(problem(*BIG))


def test_thread_count_variable_is_read_once(monkeypatch, fresh_threads):
    monkeypatch.setenv(threads.THREADS_ENV, " 3 ")
    assert threads.thread_count() == 3
    monkeypatch.setenv(threads.THREADS_ENV, "5")
    assert threads.thread_count() == 3
    with pytest.raises(ValueError, match="positive integer or None"):
        threads.set_thread_count(0)
    threads.set_thread_count(4)
    try:
        assert threads.thread_count() == 4
    finally:
        threads.set_thread_count(None)
    assert threads.thread_count() == 3


def test_pool_follows_the_thread_count(monkeypatch):
    p = problem(*BIG)
    results = []
    for count in (2, 3, 2):
        monkeypatch.setattr(threads, "thread_count", lambda: count)
        results.append(forward(p)[0])
        assert threads._pool._max_workers == count - 1
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


# The scripts run under Keras's NumPy backend: no framework's threads exist at the fork.
_SCRIPT_SETUP = """
import numpy as np
from fusedlstm.kernels.cpu import drivers
from fusedlstm.kernels.cpu import threads
from fusedlstm.kernels.gates import SIGMOID, TANH
rng = np.random.default_rng(0)
n, t, h = BIG
p = [rng.standard_normal((n, t, 4 * h)).astype("float32"),
     rng.normal(0, 0.3, (h, 4 * h)).astype("float32"),
     np.zeros((n, h), "float32"), np.zeros((n, h), "float32"), None, None]
def forward(training=False):
    return drivers.forward(*p, TANH, SIGMOID, False, training)
threads.set_thread_count(2)
"""

_SUBPROCESS_ENV = dict(os.environ, KERAS_BACKEND="numpy", PYTHONPATH=os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
     os.path.dirname(os.path.abspath(__file__))]))


def run_script(script, timeout=240):
    script = f"BIG = {BIG}\n" + _SCRIPT_SETUP + script
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=timeout, env=_SUBPROCESS_ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_no_numba_threading_layer_is_started():
    script = """
import numba
forward(training=True)
try:
    print("threading layer", numba.threading_layer())
except ValueError:  # "Threading layer is not initialized."
    print("threading layer none")
"""
    assert run_script(script).split()[-1] == "none"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_forked_child_gets_a_new_pool_and_the_same_answer():
    script = """
import os
want = forward()[0]
parent_pool = threads._pool
assert parent_pool is not None
pid = os.fork()
if pid == 0:
    code = 1
    try:
        got = forward()[0]
        pool = threads._pool
        alive = [t.is_alive() for t in pool._threads]
        code = 0 if (np.array_equal(got, want) and pool is not parent_pool and alive
                     and all(alive)) else 3
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""
    assert run_script(script).split()[-1] == "0"


def test_concurrent_calls_from_four_threads_agree(two_threads):
    p = problem(*BIG, seed=4)
    want = forward(p, training=True)
    results, errors = [], []

    def call():
        try:
            for _ in range(3):
                results.append(forward(p, training=True))
        except BaseException as error:  # noqa: BLE001 -- reported below
            errors.append(error)

    workers = [threading.Thread(target=call, daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert not errors and len(results) == 12
    for outputs, h_n, c_n, saved in results:
        for got, expected in zip((outputs, h_n, c_n, *saved), (*want[:3], *want[3])):
            np.testing.assert_array_equal(got, expected)
