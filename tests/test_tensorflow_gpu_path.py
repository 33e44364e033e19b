"""The TensorFlow GPU path of `fusedlstm.backends.tensorflow`, checked on the CPU.

No TensorFlow GPU build runs here, so these tests check the pieces one by
one: the orchestration (`tf.py_function` callbacks, custom gradient, the
weight gradients as TF ops) with the device-memory plumbing swapped for
NumPy, the DLPack adapter on CPU tensors, and the device selection. The CUDA
kernels themselves, the device-to-device copies and the synchronization only
run on a GPU.
"""

import contextlib
import ctypes

import keras
import numpy as np
import pytest

if keras.backend.backend() != "tensorflow":
    pytest.skip("needs KERAS_BACKEND=tensorflow", allow_module_level=True)

import tensorflow as tf
from cuda.core.utils import StridedMemoryView
from tensorflow.python.ops import script_ops

from fusedlstm.backends import tensorflow as ops_tensorflow
from fusedlstm.testing import projected as xw_kernels
from helpers import make_pair, run_with_grads


@pytest.fixture
def gpu_path_on_cpu(monkeypatch):
    """Routes the op through its GPU path with NumPy standing in for device memory.

    The CUDA drivers' stand-in is the CPU drivers behind their signatures
    (`xw_kernels`), which take and return NumPy arrays.
    """
    monkeypatch.setattr(ops_tensorflow, "select_kernels", lambda data_on_gpu: xw_kernels)
    monkeypatch.setattr(ops_tensorflow, "_uses_cuda_kernels", lambda tensor: True)
    monkeypatch.setattr(ops_tensorflow, "_numba_device_of",
                        lambda tensor: contextlib.nullcontext())
    monkeypatch.setattr(ops_tensorflow, "_device_arrays",
                        lambda *ts: [None if t is None else t.numpy() for t in ts])
    monkeypatch.setattr(ops_tensorflow, "_to_tf",
                        lambda arrays, device: [tf.constant(a) for a in arrays])
    calls = []
    for name in ("_gpu_forward", "_gpu_backward"):
        original = getattr(ops_tensorflow, name)
        monkeypatch.setattr(ops_tensorflow, name, _recording(original, name, calls))
    return calls


def _recording(function, name, calls):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return function(*args, **kwargs)
    return wrapper


CASES = {
    "saved": ({"return_state": True}, {"training": True}),
    "recomputed": ({"return_sequences": True}, {"training": False}),
    "masked_dropouts": ({"dropout": 0.3, "recurrent_dropout": 0.4,
                         "return_sequences": True, "return_state": True},
                        {"training": True, "mask": True, "initial_state": True}),
    "implementation_1": ({"implementation": 1, "dropout": 0.3, "recurrent_dropout": 0.2,
                          "go_backwards": True}, {"training": True, "mask": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_path_matches_stock_layer(case, gpu_path_on_cpu):
    kwargs, options = CASES[case]
    rng = np.random.default_rng(len(case))
    batch, steps, features, units = 4, 6, 3, 5
    x = rng.standard_normal((batch, steps, features)).astype("float32")
    mask = rng.random((batch, steps)) > 0.3 if options.get("mask") else None
    states = None
    if options.get("initial_state"):
        states = [rng.standard_normal((batch, units)).astype("float32") for _ in range(2)]
    stock, fused = make_pair(units=units, random_seed=3, **kwargs)
    stock_out, stock_grads = run_with_grads(stock, x, mask, states, options["training"])
    fused_out, fused_grads = run_with_grads(fused, x, mask, states, options["training"])
    assert gpu_path_on_cpu.count("_gpu_backward") == 1
    for s, f in zip(stock_out, fused_out, strict=True):
        np.testing.assert_allclose(f, s, atol=1e-5)
    for name, s in stock_grads.items():
        np.testing.assert_allclose(fused_grads[name], s, atol=1e-4, err_msg=name)


def test_gpu_path_in_a_graph(gpu_path_on_cpu):
    stock, fused = make_pair(units=4, random_seed=2, return_sequences=True)
    x = np.random.default_rng(0).standard_normal((3, 5, 2)).astype("float32")

    def outputs_and_grads(layer):
        @tf.function(input_signature=[tf.TensorSpec([None, None, 2], tf.float32)])
        def run(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * tf.range(5, dtype=tf.float32)[:, None])
            return [y] + tape.gradient(loss, [x] + layer.trainable_weights)
        return run(x)

    expected = outputs_and_grads(stock)
    for e, f in zip(expected, outputs_and_grads(fused), strict=True):
        np.testing.assert_allclose(f, e, atol=1e-4)
    assert gpu_path_on_cpu == ["_gpu_forward", "_gpu_backward"]


def test_gpu_path_leaves_no_tape_cache_entries(gpu_path_on_cpu):
    _, fused = make_pair(units=3)
    x = tf.ones((2, 4, 3))
    before = len(script_ops.tape_cache)
    for _ in range(3):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(fused(x, training=True))
        tape.gradient(loss, x)
    assert len(script_ops.tape_cache) == before


def test_dlpack_export_gives_a_writable_view_of_tf_memory():
    output = tf.raw_ops.Empty(shape=[2, 3], dtype=tf.float32, init=False)
    with pytest.raises(RuntimeError, match="stream"):
        output.__dlpack__(stream=-1)
    view = StridedMemoryView.from_dlpack(ops_tensorflow._DLPackExport(output), stream_ptr=-1)
    assert (tuple(view.shape), np.dtype(view.dtype), view.readonly) == (
        (2, 3), np.float32, False)
    written = np.arange(6, dtype=np.float32).reshape(2, 3)
    ctypes.memmove(view.ptr, written.ctypes.data, written.nbytes)
    np.testing.assert_array_equal(output.numpy(), written)

    mask = tf.constant([[True, False]])
    view = StridedMemoryView.from_dlpack(ops_tensorflow._DLPackExport(mask), stream_ptr=-1)
    assert np.dtype(view.dtype) == np.bool_


def test_device_selection(monkeypatch):
    assert not ops_tensorflow.runs_on_gpu(tf.constant([1.0]))
    with tf.Graph().as_default():
        with tf.device("/GPU:1"):
            on_gpu = tf.compat.v1.placeholder(tf.float32, [2])
        with tf.device("/CPU:0"):
            on_cpu = tf.compat.v1.placeholder(tf.float32, [2])
        unplaced = tf.compat.v1.placeholder(tf.float32, [2])
    assert ops_tensorflow.runs_on_gpu(on_gpu)
    assert not ops_tensorflow.runs_on_gpu(on_cpu)
    assert ops_tensorflow.runs_on_gpu(unplaced) == bool(tf.config.list_logical_devices("GPU"))
    monkeypatch.setenv("FUSEDLSTM_KERNEL", "cpu")
    assert not ops_tensorflow._uses_cuda_kernels(on_gpu)
    with pytest.raises(RuntimeError, match="CPU:0"):
        with ops_tensorflow._numba_device_of(tf.constant([1.0])):
            pass
