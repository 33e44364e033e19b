"""`fusedlstm.LSTM` inside the distribution engines users scale training out with.

Each engine runs in fresh subprocesses (device counts and cluster settings are
read once, when the framework starts), so each test runs in one pass of the
suite only, the pass of its framework's backend:

- JAX: Keras's `DataParallel` over two host devices
  (`--xla_force_host_platform_device_count=2`) trains the fused layer to the
  stock layer's loss curve, each device running the kernels on its own rows.
- TensorFlow: `tf.distribute.MultiWorkerMirroredStrategy` with two worker
  processes on 127.0.0.1 trains to the curve of one process without a
  strategy. Every wait is bounded, so a worker that cannot reach its peer
  fails the test instead of hanging CI.
- TensorFlow: `tf.distribute.MirroredStrategy` over two logical CPUs, on 65
  samples at batch 32: the last batch leaves one replica an empty batch,
  which once hung the fused layer forever; the losses match the stock layer's.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
TIMEOUT_S = 300

COMMON = """
import json, os
import numpy as np
import keras
import fusedlstm
import fusedlstm.ops

calls = []
original = fusedlstm.ops.lstm_sequence
fusedlstm.ops.lstm_sequence = lambda *a, **k: calls.append(1) or original(*a, **k)
rng = np.random.default_rng(0)
x = rng.normal(size=(32, 10, 3)).astype("float32")
y = rng.normal(size=(32, 1)).astype("float32")
GLOBAL_BATCH, EPOCHS = 8, 3


def new_model(layer_class):
    keras.utils.set_random_seed(4)
    return keras.Sequential([keras.Input((10, 3)), layer_class(8), keras.layers.Dense(1)])
"""

DATA_PARALLEL = COMMON + """
import jax
from fusedlstm.kernels import cpu

kernel_rows = []
forward = cpu.forward
cpu.forward = lambda xw, *a, **k: kernel_rows.append(xw.shape[0]) or forward(xw, *a, **k)


def fit(layer_class):
    model = new_model(layer_class)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    return history.history["loss"]


devices = jax.devices()
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
stock = fit(keras.layers.LSTM)
fused = fit(fusedlstm.LSTM)
print(json.dumps({"devices": len(devices), "stock": stock, "fused": fused,
                  "fused_calls": len(calls), "kernel_rows": sorted(set(kernel_rows))}))
"""

# A custom loop: Keras 3's `fit` fails under MultiWorkerMirroredStrategy
# (keras-team/keras#20585). Worker i takes rows [4i, 4i + 4) of each global batch.
MULTI_WORKER = COMMON + """
import tensorflow as tf


def worker_rows(context):
    batch = context.get_per_replica_batch_size(GLOBAL_BATCH)
    start = context.input_pipeline_id * batch
    xs, ys = (a.reshape(-1, GLOBAL_BATCH, *a.shape[1:])[:, start:start + batch]
              for a in (x, y))
    return tf.data.Dataset.from_tensor_slices(
        (xs.reshape(-1, *x.shape[1:]), ys.reshape(-1, 1))).batch(batch)


def train(strategy):
    with strategy.scope():
        model = new_model(fusedlstm.LSTM)
        optimizer = keras.optimizers.SGD(0.05)

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(xb, training=True) - yb)) / GLOBAL_BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def step(xb, yb):
        return strategy.reduce("SUM", strategy.run(replica_step, args=(xb, yb)), axis=None)

    losses = []
    for _ in range(EPOCHS):
        batches = strategy.distribute_datasets_from_function(worker_rows)
        losses.append(float(np.mean([step(xb, yb) for xb, yb in batches])))
    return losses


if "TF_CONFIG" in os.environ:
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=120))
else:
    strategy = tf.distribute.get_strategy()
losses = train(strategy)
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "losses": losses,
                  "fused_calls": len(calls)}))
"""


def start_python(code, env):
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env})


def finish(process, deadline_s=TIMEOUT_S):
    """The last stdout line of `process` as JSON; kills it past `deadline_s`."""
    try:
        stdout, stderr = process.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"a subprocess ran past {deadline_s} s:\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def free_ports(count):
    """Ports free on 127.0.0.1 now (the OS picks them; they are released at once)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.skipif(BACKEND != "jax", reason="runs in the KERAS_BACKEND=jax pass")
def test_jax_data_parallel_on_two_host_devices_matches_stock():
    result = finish(start_python(DATA_PARALLEL, {
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}))
    assert result["devices"] == 2
    assert result["fused_calls"] > 0
    assert result["kernel_rows"] == [4], "each device runs the kernel on its half of a batch of 8"
    np.testing.assert_allclose(result["fused"], result["stock"], rtol=1e-4)
    assert result["fused"][-1] < result["fused"][0]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="runs in the KERAS_BACKEND=tensorflow pass")
def test_tf_multi_worker_mirrored_two_processes_match_one_process():
    env = {"KERAS_BACKEND": "tensorflow"}
    single = start_python(MULTI_WORKER, env)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers = [start_python(MULTI_WORKER, {**env, "TF_CONFIG": json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": index}})})
        for index in range(2)]
    try:
        results = [finish(worker) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    expected = finish(single)
    assert expected["replicas"] == 1
    for result in results:
        assert result["replicas"] == 2
        assert result["fused_calls"] > 0
        np.testing.assert_allclose(result["losses"], expected["losses"], rtol=1e-4)
    assert expected["losses"][-1] < expected["losses"][0]


UNEVEN_MIRRORED = """
import json
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import fusedlstm
import fusedlstm.ops

calls = []
original = fusedlstm.ops.lstm_sequence
fusedlstm.ops.lstm_sequence = lambda *a, **k: calls.append(1) or original(*a, **k)
rng = np.random.default_rng(0)
x = rng.standard_normal((65, 6, 3)).astype("float32")
y = rng.standard_normal((65, 1)).astype("float32")
losses = {}
for name, layer_class in (("stock", keras.layers.LSTM), ("fused", fusedlstm.LSTM)):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((6, 3)), layer_class(4), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    losses[name] = model.fit(x, y, batch_size=32, epochs=2, shuffle=False,
                             verbose=0).history["loss"]
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "losses": losses,
                  "fused_calls": len(calls)}))
"""


@pytest.mark.skipif(BACKEND != "tensorflow", reason="runs in the KERAS_BACKEND=tensorflow pass")
def test_tf_mirrored_with_an_empty_replica_batch_matches_stock():
    result = finish(start_python(UNEVEN_MIRRORED, {"KERAS_BACKEND": "tensorflow"}),
                    deadline_s=120)
    assert result["replicas"] == 2 and result["fused_calls"] > 0
    np.testing.assert_allclose(result["losses"]["fused"], result["losses"]["stock"], rtol=1e-5)
