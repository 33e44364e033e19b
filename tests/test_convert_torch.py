"""`fusedlstm.convert.weights_to_torch` / `weights_from_torch`: one LSTM's weights both ways."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import fusedlstm
from fusedlstm import convert
from helpers import to_numpy

torch = pytest.importorskip("torch")

N, T, C, H = 3, 7, 4, 5
LAYERS = [keras.layers.LSTM, fusedlstm.LSTM]


def inputs():
    return np.random.default_rng(0).standard_normal((N, T, C)).astype("float32")


def keras_lstm(layer_class, use_bias):
    """A built Keras LSTM returning the sequence and both final states."""
    keras.utils.set_random_seed(1)
    layer = layer_class(H, use_bias=use_bias, return_sequences=True, return_state=True)
    layer.build((N, T, C))
    return layer


def keras_results(layer, x):
    """`[outputs [N, T, H], h [N, H], c [N, H]]` as NumPy arrays."""
    return [to_numpy(y) for y in layer(x)]


def torch_results(lstm, x):
    """The same three results from a `batch_first` `torch.nn.LSTM`."""
    with torch.no_grad():
        outputs, (h, c) = lstm(torch.from_numpy(x))
    return [outputs.numpy(), h[0].numpy(), c[0].numpy()]


def assert_same_results(actual, expected):
    for name, a, e in zip(("outputs", "h", "c"), actual, expected):
        assert a.shape == e.shape, name
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-5, err_msg=name)


def random_keras_weights(layer):
    """Non-zero values in every weight, the bias included, with distinct gate blocks."""
    rng = np.random.default_rng(2)
    return [rng.uniform(-0.6, 0.6, w.shape).astype("float32") for w in layer.get_weights()]


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("layer_class", LAYERS)
def test_torch_lstm_with_converted_keras_weights_matches(layer_class, use_bias):
    layer = keras_lstm(layer_class, use_bias)
    layer.set_weights(random_keras_weights(layer))
    lstm = torch.nn.LSTM(C, H, bias=use_bias, batch_first=True)
    lstm.load_state_dict(convert.weights_to_torch(layer.get_weights()))
    x = inputs()
    assert_same_results(torch_results(lstm, x), keras_results(layer, x))


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("layer_class", LAYERS)
def test_keras_lstm_with_converted_torch_weights_matches(layer_class, use_bias):
    torch.manual_seed(3)
    lstm = torch.nn.LSTM(C, H, bias=use_bias, batch_first=True)
    if use_bias:
        assert not torch.equal(lstm.bias_ih_l0, lstm.bias_hh_l0)
    layer = keras_lstm(layer_class, use_bias)
    layer.set_weights(convert.weights_from_torch(lstm.state_dict()))
    x = inputs()
    assert_same_results(keras_results(layer, x), torch_results(lstm, x))


def test_layouts_and_round_trip():
    layer = keras_lstm(fusedlstm.LSTM, use_bias=True)
    weights = random_keras_weights(layer)
    state = convert.weights_to_torch(weights)
    assert {key: tuple(value.shape) for key, value in state.items()} == {
        "weight_ih_l0": (4 * H, C), "weight_hh_l0": (4 * H, H),
        "bias_ih_l0": (4 * H,), "bias_hh_l0": (4 * H,)}
    assert all(value.dtype == torch.float32 for value in state.values())
    np.testing.assert_array_equal(state["weight_ih_l0"][H:2 * H].numpy(),
                                  weights[0][:, H:2 * H].T)
    assert not state["bias_hh_l0"].any()
    back = convert.weights_from_torch(state)
    assert [w.tobytes() for w in back] == [w.tobytes() for w in weights]


def test_from_torch_takes_numpy_arrays():
    state = {key: value.numpy() for key, value in
             torch.nn.LSTM(C, H, bias=False).state_dict().items()}
    kernel, recurrent_kernel = convert.weights_from_torch(state)
    assert kernel.shape == (C, 4 * H) and recurrent_kernel.shape == (H, 4 * H)


@pytest.mark.parametrize("lstm_kwargs, received", [
    ({"bidirectional": True}, "weight_ih_l0_reverse"),
    ({"num_layers": 2}, "weight_ih_l1"),
    ({"proj_size": 2}, "weight_hr_l0"),
])
def test_from_torch_rejects_other_lstms(lstm_kwargs, received):
    state = torch.nn.LSTM(C, H, **lstm_kwargs).state_dict()
    with pytest.raises(ValueError, match=rf"one-layer, one-direction.*Received: keys .*{received}"):
        convert.weights_from_torch(state)


@pytest.mark.parametrize("change, message", [
    ({"weight_hh_l0": np.zeros((4 * H, H + 1), "float32")},
     r"Expected weight_hh_l0 of shape \(20, 5\).*Received: weight_hh_l0 of shape \(20, 6\)"),
    ({"bias_hh_l0": np.zeros(4 * H - 1, "float32")},
     r"Expected bias_hh_l0 of shape \(20,\).*Received: bias_hh_l0 of shape \(19,\)"),
    ({"weight_ih_l0": np.zeros((4 * H - 2, C), "float32")},
     r"Expected weight_ih_l0 of shape \(4H, C\).*Received: weight_ih_l0 of shape \(18, 4\)"),
])
def test_from_torch_rejects_wrong_shapes(change, message):
    state = dict(torch.nn.LSTM(C, H).state_dict(), **change)
    with pytest.raises(ValueError, match=message):
        convert.weights_from_torch(state)


@pytest.mark.parametrize("weights, message", [
    ([np.zeros((C, 4 * H))], r"Expected an LSTM's get_weights\(\).*Received: 1 arrays"),
    ([np.zeros((C, 4 * H)), np.zeros((H, 4 * H + 4))],
     r"Expected recurrent_kernel of shape \(5, 20\).*Received: recurrent_kernel of shape \(5, 24\)"),
    ([np.zeros((C, 4 * H)), np.zeros((H, 4 * H)), np.zeros(4 * H + 1)],
     r"Expected bias of shape \(20,\).*Received: bias of shape \(21,\)"),
    ([np.zeros((C, 4 * H + 1)), np.zeros((H, 4 * H))],
     r"Expected kernel of shape \(C, 4H\).*Received: kernel of shape \(4, 21\)"),
    ("weights", r"Received: weights='weights' of type <class 'str'>"),
])
def test_to_torch_rejects_other_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        convert.weights_to_torch(weights)


IMPORTS_SCRIPT = """
import sys
import numpy as np
from fusedlstm import convert
H = 2
convert.weights_from_torch({"weight_ih_l0": np.ones((4 * H, 3)), "weight_hh_l0": np.ones((4 * H, H))})
print("torch" in sys.modules)
"""


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="Keras's torch backend imports it")
def test_convert_imports_torch_only_when_weights_to_torch_runs():
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    result = subprocess.run([sys.executable, "-c", IMPORTS_SCRIPT], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False"]
