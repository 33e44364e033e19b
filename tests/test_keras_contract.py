"""fusedlstm.LSTM behaves as keras.layers.LSTM everywhere Keras uses a layer."""

import doctest
import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import keras
import numpy as np
import pytest

import fusedlstm
import fusedlstm.ops
from fusedlstm.kernels.cpu.threads import block_bounds
from helpers import make_pair, to_numpy

ON_TF = keras.backend.backend() == "tensorflow"
GOLDEN_INIT = {
    "kernel_initializer": keras.initializers.Constant(0.01),
    "recurrent_initializer": keras.initializers.Constant(0.02),
    "bias_initializer": keras.initializers.Constant(0.03),
}



@pytest.mark.parametrize("kwargs,expected", [
    ({}, [0.6288687, 0.86899155, 0.9460773]),
    ({"go_backwards": True}, [0.35622165, 0.74789524, 0.8872726]),
    ({"unit_forget_bias": False}, [0.57019705, 0.8661914, 0.9459622]),
    ({"use_bias": False}, [0.54986924, 0.86226785, 0.9443936]),
    ({"implementation": 1}, [0.6288687, 0.86899155, 0.9460773]),
])
def test_keras_golden_numbers(fused_calls, kwargs, expected):
    sequence = np.arange(72).reshape((3, 6, 4)).astype("float32")
    layer = fusedlstm.LSTM(3, use_fused=True, **GOLDEN_INIT, **kwargs)
    output = to_numpy(layer(sequence))
    np.testing.assert_allclose(output, np.repeat(np.array(expected)[:, None], 3, 1),
                               atol=1e-5, rtol=1e-5)
    assert fused_calls


def test_config_round_trip_keeps_every_argument():
    layer = fusedlstm.LSTM(7, activation="softsign", dropout=0.1, recurrent_dropout=0.2,
                           return_sequences=True, go_backwards=True, use_fused=True,
                           use_cudnn=False, seed=3, name="enc")
    config = layer.get_config()
    assert config["use_fused"] is True and config["use_cudnn"] is False
    clone = fusedlstm.LSTM.from_config(config)
    assert clone.get_config() == config
    stock_keys = set(keras.layers.LSTM(7).get_config())
    assert stock_keys | {"use_fused", "use_cudnn"} == set(config)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, fusedlstm.LSTM) and restored.get_config() == config


@pytest.mark.skipif(not ON_TF, reason="the example prints TensorFlow shapes")
def test_docstring_example_runs():
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(fusedlstm.LSTM, "LSTM"):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted >= 6 and results.failed == 0


def test_supports_jit_is_off_only_where_the_op_is_a_callback():
    # On JAX the op is an XLA custom call; elsewhere it is a Python callback.
    expected = keras.backend.backend() in fusedlstm.ops.JIT_COMPATIBLE_BACKENDS
    assert fusedlstm.LSTM(2).supports_jit is expected
    assert fusedlstm.LSTM(2, use_fused=False).supports_jit is True


def test_symbolic_output_shape_and_dtype():
    inputs = keras.Input((9, 4))
    seq, h, c = fusedlstm.LSTM(5, return_sequences=True, return_state=True)(inputs)
    assert tuple(seq.shape) == (None, 9, 5) and tuple(h.shape) == tuple(c.shape) == (None, 5)
    assert seq.dtype == "float32"


def test_a_mask_from_a_masking_layer_is_applied_and_passed_on(fused_calls):
    """Keras hands the layer a mask (supports_masking), the layer skips the masked
    steps, and with return_sequences passes the mask on to the next layer."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 3)).astype("float32")
    padded = np.concatenate([x, np.zeros((2, 3, 3), "float32")], axis=1)
    layer = fusedlstm.LSTM(5)
    direct = to_numpy(layer(x))
    model = keras.Sequential([keras.Input((7, 3)), keras.layers.Masking(0.0), layer])
    np.testing.assert_allclose(to_numpy(model(padded)), direct, atol=1e-6)
    assert np.abs(to_numpy(layer(padded)) - direct).max() > 1e-3  # the padding matters
    mask = np.arange(7)[None, :].repeat(2, 0) < 4
    sequences = fusedlstm.LSTM(5, return_sequences=True)
    np.testing.assert_array_equal(to_numpy(sequences.compute_mask(padded, mask)), mask)
    assert layer.compute_mask(padded, mask) is None
    assert fused_calls


def test_embedding_mask_zero_runs_fused(fused_calls):
    keras.utils.set_random_seed(0)
    tokens = np.array([[0, 0, 3, 4, 5], [1, 2, 0, 4, 0]])
    outputs = []
    for layer_class in (keras.layers.LSTM, fusedlstm.LSTM):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.layers.Embedding(8, 4, mask_zero=True),
                                  layer_class(3, return_sequences=True)])
        outputs.append(to_numpy(model(tokens)))
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-6)
    assert fused_calls


@pytest.mark.parametrize("wrapper", ["bidirectional", "time_distributed"])
def test_wrappers_run_fused(fused_calls, wrapper):
    rng = np.random.default_rng(0)
    results = []
    for layer_class in (keras.layers.LSTM, fusedlstm.LSTM):
        keras.utils.set_random_seed(1)
        if wrapper == "bidirectional":
            layer = keras.layers.Bidirectional(layer_class(4, return_sequences=True))
            x = rng.normal(size=(3, 6, 5)).astype("float32")
        else:
            layer = keras.layers.TimeDistributed(layer_class(4))
            x = rng.normal(size=(3, 2, 6, 5)).astype("float32")
        results.append(to_numpy(layer(x)))
        rng = np.random.default_rng(0)
    np.testing.assert_allclose(results[1], results[0], atol=1e-5)
    assert len(fused_calls) >= (2 if wrapper == "bidirectional" else 1)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_runs_fused_in_float32(fused_calls, policy):
    x = np.random.default_rng(0).normal(size=(4, 5, 3)).astype("float32")
    keras.utils.set_random_seed(2)
    reference = to_numpy(fusedlstm.LSTM(6, return_sequences=True)(x))
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(2)
        layer = fusedlstm.LSTM(6, return_sequences=True)
        y = layer(x)
    finally:
        keras.config.set_dtype_policy("float32")
    assert keras.backend.standardize_dtype(y.dtype) == policy.split("_")[1]
    assert all(w.dtype == "float32" for w in layer.weights)
    np.testing.assert_allclose(to_numpy(keras.ops.cast(y, "float32")), reference, atol=3e-2)
    assert len(fused_calls) == 2


def test_stateful_matches_stock_over_consecutive_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(2, 3, 4)).astype("float32") for _ in range(3)]
    stock, fused = make_pair(units=4, stateful=True, return_sequences=True)
    for x in batches:
        np.testing.assert_allclose(to_numpy(fused(x)), to_numpy(stock(x)), atol=1e-5)
    for layer in (stock, fused):
        layer.reset_states()
    np.testing.assert_allclose(to_numpy(fused(batches[0])), to_numpy(stock(batches[0])), atol=1e-5)


def training_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12, 3)).astype("float32")
    y = (x[:, :, 0].cumsum(1)[:, -1:] > 0).astype("float32")
    return x, y


def train(layer_class, epochs=4, **kwargs):
    x, y = training_data()
    keras.utils.set_random_seed(9)
    model = keras.Sequential([keras.Input((12, 3)), layer_class(8, **kwargs),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    history = model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return model, np.array(history.history["loss"])


@pytest.mark.parametrize("kwargs", [{}, {"recurrent_dropout": 0.2, "dropout": 0.1, "seed": 3}],
                         ids=["plain", "dropouts"])
def test_training_loss_curves_match_stock(kwargs):
    _, stock_losses = train(keras.layers.LSTM, **kwargs)
    model, fused_losses = train(fusedlstm.LSTM, **kwargs)
    np.testing.assert_allclose(fused_losses, stock_losses, rtol=1e-4)
    assert fused_losses[-1] < fused_losses[0]


def test_fit_evaluate_predict():
    model, _ = train(fusedlstm.LSTM, epochs=1)
    x, y = training_data()
    loss = model.evaluate(x, y, verbose=0)
    predicted = model.predict(x, batch_size=16, verbose=0)
    assert np.isfinite(loss)
    np.testing.assert_allclose(predicted, to_numpy(model(x)), atol=1e-5)


@pytest.mark.skipif(not ON_TF, reason="tf.function is TensorFlow's")
def test_inside_tf_function_matches_eager():
    import tensorflow as tf

    layer = fusedlstm.LSTM(5, return_sequences=True, return_state=True)
    x = np.random.default_rng(0).normal(size=(3, 7, 2)).astype("float32")
    mask = np.ones((3, 7), bool)
    mask[1, 4:] = False
    eager = [to_numpy(t) for t in layer(x, mask=mask)]

    @tf.function
    def step(x, mask):
        with tf.GradientTape() as tape:
            outputs = layer(x, mask=mask, training=True)
            loss = tf.reduce_sum(outputs[0])
        return outputs, tape.gradient(loss, layer.trainable_weights)

    graph, grads = step(tf.constant(x), tf.constant(mask))
    for a, b in zip(graph, eager):
        np.testing.assert_allclose(to_numpy(a), b, atol=1e-6)
    assert all(np.isfinite(to_numpy(g)).all() for g in grads)


def test_auto_falls_back_with_one_warning_and_true_raises():
    x = np.random.default_rng(0).normal(size=(2, 4, 3)).astype("float32")
    stock, fused = make_pair(units=3, unroll=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fused(x)
        fused(x)
    messages = [str(w.message) for w in caught if "stock LSTM loop" in str(w.message)]
    assert len(messages) == 1 and "unroll=True" in messages[0]
    np.testing.assert_allclose(to_numpy(first), to_numpy(stock(x)), atol=1e-6)
    with pytest.raises(ValueError, match="cannot run fused.*unroll=True"):
        fusedlstm.LSTM(3, unroll=True, use_fused=True)
    with pytest.raises(ValueError, match="`activation` must be one of"):
        fusedlstm.LSTM(3, activation="gelu", use_fused=True)


def test_use_fused_false_is_the_stock_layer(fused_calls):
    x = np.random.default_rng(0).normal(size=(2, 4, 3)).astype("float32")
    keras.utils.set_random_seed(1)
    stock = keras.layers.LSTM(3)
    keras.utils.set_random_seed(1)
    fused = fusedlstm.LSTM(3, use_fused=False)
    np.testing.assert_array_equal(to_numpy(fused(x)), to_numpy(stock(x)))
    assert not fused_calls


def test_concurrent_calls_from_four_threads_agree_exactly():
    # Four Python threads, two per layer. Large enough that each call runs its rows as several blocks on several threads.
    x = np.random.default_rng(0).normal(size=(32, 30, 6)).astype("float32")
    assert len(block_bounds(32, 30 * 8 * 64 * 64, 2)) > 1
    layers = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        layers.append(fusedlstm.LSTM(64, return_sequences=True))
    expected = [to_numpy(layer(x)) for layer in layers]
    errors = []

    def worker(layer, want):
        for _ in range(10):
            got = to_numpy(layer(x))
            if not np.array_equal(got, want):  # the same rows, the same code: bit for bit
                errors.append(float(np.abs(got - want).max()))

    threads = [threading.Thread(target=worker, args=(layer, want))
               for layer, want in zip(layers * 2, expected * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors


def run_python(code, env=None):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_python_with_stderr(code, env):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_first_compile_is_announced_once_then_cached_on_disk(tmp_path):
    code = """
        import json, numpy as np
        from fusedlstm.kernels import cpu
        from fusedlstm.kernels.cpu import steps
        x, kernel = np.ones((1, 2, 3), np.float32), np.ones((3, 8), np.float32)
        recurrent_kernel, bias = np.ones((2, 8), np.float32), np.zeros(8, np.float32)
        state = np.zeros((1, 2), np.float32)
        args = (x, kernel, bias, recurrent_kernel, state, state, None, None, None, 0, 1, False)
        outputs, h_n, c_n, saved = cpu.forward(*args, True)
        cpu.backward(x, kernel, recurrent_kernel, None, None, None, 0, 1, False, saved, outputs,
                     h_n, c_n)
        cpu.forward(*args, False)
        stats = [kernel.stats for kernel in steps.block_kernels(0, 1)]
        print(json.dumps({"hits": sum(sum(s.cache_hits.values()) for s in stats),
                          "misses": sum(sum(s.cache_misses.values()) for s in stats)}))
    """
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    first, first_err = run_python_with_stderr(code, env)
    second, second_err = run_python_with_stderr(code, env)
    assert first == {"hits": 0, "misses": 2}
    assert second == {"hits": 2, "misses": 0}
    notices = [line for line in first_err.splitlines() if line.startswith("fusedlstm: compiling")]
    assert len(notices) == 1, first_err[-2000:]
    assert "activation='tanh', recurrent_activation='sigmoid'" in notices[0]
    assert str(tmp_path) in notices[0]
    assert "fusedlstm: compiling" not in second_err


@pytest.mark.skipif(not ON_TF, reason="tf.distribute is TensorFlow's")
def test_mirrored_strategy_on_two_logical_cpus():
    code = """
        import json, numpy as np, tensorflow as tf, keras
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import fusedlstm
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 10, 3)).astype("float32")
        y = rng.normal(size=(32, 1)).astype("float32")
        losses = {}
        for name, cls in (("stock", keras.layers.LSTM), ("fused", fusedlstm.LSTM)):
            keras.utils.set_random_seed(4)
            with strategy.scope():
                model = keras.Sequential([keras.Input((10, 3)), cls(8), keras.layers.Dense(1)])
                model.compile("sgd", "mse")
            history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
            losses[name] = history.history["loss"]
        print(json.dumps({"replicas": strategy.num_replicas_in_sync, **losses}))
    """
    result = run_python(code)
    assert result["replicas"] == 2
    np.testing.assert_allclose(result["fused"], result["stock"], rtol=1e-4)
