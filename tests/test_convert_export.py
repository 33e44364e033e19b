"""`fusedlstm.convert`: conversions both ways, and export for serving (TensorFlow)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

if keras.backend.backend() != "tensorflow":
    pytest.skip("needs KERAS_BACKEND=tensorflow", allow_module_level=True)

import fusedlstm
from fusedlstm import convert

# The nested Sequential drops the mask it receives, which is fine here.
pytestmark = pytest.mark.filterwarnings("ignore:Layer 'nested'.*does not support masking")

STEPS, FEATURES = 7, 3


def sequential_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((STEPS, FEATURES), name="tokens"),
        keras.layers.LSTM(6, return_sequences=True, name="lower"),
        keras.layers.LSTM(5, unit_forget_bias=False, name="upper"),
        keras.layers.Dense(2, name="head"),
    ], name="sequential_lstm")


def functional_model(lstm=keras.layers.LSTM):
    """Masking, a Bidirectional LSTM, stacked LSTMs and a nested Sequential."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((STEPS, FEATURES), name="frames")
    masked = keras.layers.Masking(name="padding")(inputs)
    both = keras.layers.Bidirectional(lstm(4, return_sequences=True), name="both_ways")(masked)
    stacked = lstm(5, return_sequences=True, go_backwards=True, name="stacked")(both)
    nested = keras.Sequential([lstm(3, recurrent_activation="hard_sigmoid", name="inner")],
                              name="nested")(stacked)
    outputs = keras.layers.Dense(2, name="head")(nested)
    return keras.Model(inputs, outputs, name="functional_lstm")


def sample_inputs(batch=4):
    x = np.random.default_rng(3).standard_normal((batch, STEPS, FEATURES)).astype("float32")
    x[0, :3] = 0.0  # left padding, masked by the Masking layer
    x[1, 4:] = 0.0  # right padding
    return x


def all_layers(model):
    """Every layer, depth first, including nested models' and wrappers' layers."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)
        if isinstance(layer, keras.layers.Bidirectional):
            yield layer.forward_layer
            yield layer.backward_layer


def lstm_layers(model):
    return [layer for layer in all_layers(model) if isinstance(layer, keras.layers.LSTM)]


def stock_config(layer):
    config = layer.get_config()
    for key in ("use_fused", "use_cudnn"):
        config.pop(key, None)
    return config


def assert_same_weights(actual, expected):
    assert len(actual.weights) == len(expected.weights)
    for a, e in zip(actual.weights, expected.weights):
        assert a.path == e.path
        assert np.asarray(a).tobytes() == np.asarray(e).tobytes(), a.path


def assert_converted(converted, original, lstm_class):
    assert [layer.name for layer in all_layers(converted)] == [
        layer.name for layer in all_layers(original)]
    assert all(type(layer) is lstm_class for layer in lstm_layers(converted))
    assert [stock_config(c) for c in lstm_layers(converted)] == [
        stock_config(o) for o in lstm_layers(original)]
    assert_same_weights(converted, original)
    x = sample_inputs()
    np.testing.assert_allclose(converted.predict(x, verbose=0), original.predict(x, verbose=0),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("build", [sequential_model, functional_model])
def test_to_fused_and_back(build):
    stock = build()
    fused = convert.to_fused(stock)
    assert len(lstm_layers(fused)) == len(lstm_layers(stock)) > 0
    assert_converted(fused, stock, fusedlstm.LSTM)

    back = convert.to_stock(fused)
    assert_converted(back, stock, keras.layers.LSTM)
    assert all("use_fused" not in layer.get_config() for layer in lstm_layers(back))


def test_conversion_keeps_the_original_model():
    stock = sequential_model()
    convert.to_fused(stock)
    assert all(type(layer) is keras.layers.LSTM for layer in lstm_layers(stock))


def test_conversion_rejects_a_layer():
    with pytest.raises(ValueError, match="Expected a `keras.Model`"):
        convert.to_fused(keras.layers.LSTM(3))


SERVE_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])  # keep it: serve() needs its variables
np.save(sys.argv[3], loaded.serve(np.load(sys.argv[2])).numpy())
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("fusedlstm", "numba"))))
"""


def test_exported_model_serves_in_a_fresh_process(tmp_path):
    model = functional_model(lstm=fusedlstm.LSTM)
    x = sample_inputs(batch=5)
    expected = model.predict(x, verbose=0)
    path = str(tmp_path / "saved_model")
    convert.export(model, path, verbose=False)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", SERVE_SCRIPT, path, str(tmp_path / "x.npy"),
         str(tmp_path / "served.npy")],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    np.testing.assert_allclose(np.load(tmp_path / "served.npy"), expected, rtol=0, atol=1e-5)
