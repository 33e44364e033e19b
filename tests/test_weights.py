"""The weight layout contract: byte-identical weights, checkpoints both ways,
parameter counts and the gate order i, f, c, o."""

import keras
import numpy as np
import pytest

import fusedlstm
from helpers import make_pair, to_numpy

INITIALIZER_CASES = {
    "default": {},
    "seeded": {
        "kernel_initializer": keras.initializers.GlorotUniform(seed=11),
        "recurrent_initializer": keras.initializers.Orthogonal(seed=12),
        "bias_initializer": keras.initializers.RandomNormal(seed=13),
    },
    "strings": {"kernel_initializer": "he_normal", "recurrent_initializer": "glorot_normal"},
}


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("unit_forget_bias", [True, False])
@pytest.mark.parametrize("case", sorted(INITIALIZER_CASES))
def test_get_weights_byte_identical_to_stock(case, unit_forget_bias, use_bias):
    stock, fused = make_pair(random_seed=42, units=5, unit_forget_bias=unit_forget_bias,
                             use_bias=use_bias, **INITIALIZER_CASES[case])
    stock.build((None, 3, 7))
    fused.build((None, 3, 7))
    stock_weights, fused_weights = stock.get_weights(), fused.get_weights()
    assert len(fused_weights) == len(stock_weights) == (3 if use_bias else 2)
    for s, f in zip(stock_weights, fused_weights):
        assert f.dtype == s.dtype and f.shape == s.shape
        assert f.tobytes() == s.tobytes()


def test_variable_paths_match_stock():
    paths = []
    for layer_class in (keras.layers.LSTM, fusedlstm.LSTM):
        keras.backend.clear_session()
        layer = layer_class(2)
        layer.build((None, 5, 4))
        paths.append([w.path for w in layer.weights])
    assert paths[1] == paths[0] == [
        "lstm/lstm_cell/kernel", "lstm/lstm_cell/recurrent_kernel", "lstm/lstm_cell/bias"]


def build_model(layer_class, **kwargs):
    return keras.Sequential([
        keras.Input((6, 4)),
        layer_class(3, return_sequences=True, **kwargs),
        layer_class(2),
        keras.layers.Dense(1),
    ])


@pytest.mark.parametrize("source,target", [(keras.layers.LSTM, fusedlstm.LSTM),
                                           (fusedlstm.LSTM, keras.layers.LSTM)])
def test_weights_h5_loads_both_ways(tmp_path, source, target):
    keras.utils.set_random_seed(3)
    saved = build_model(source)
    path = str(tmp_path / "model.weights.h5")
    saved.save_weights(path)
    keras.utils.set_random_seed(4)
    loaded = build_model(target)
    loaded.load_weights(path)
    x = np.random.default_rng(0).normal(size=(5, 6, 4)).astype("float32")
    for a, b in zip(saved.get_weights(), loaded.get_weights()):
        assert a.tobytes() == b.tobytes()
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(saved(x)), atol=1e-6, rtol=0)


def test_keras_file_round_trips(tmp_path):
    keras.utils.set_random_seed(5)
    model = build_model(fusedlstm.LSTM, use_fused=True)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[0], fusedlstm.LSTM)
    assert loaded.layers[0].use_fused is True
    x = np.random.default_rng(1).normal(size=(2, 6, 4)).astype("float32")
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-6, rtol=0)


def test_worked_example_59_parameters():
    model = keras.Sequential([keras.Input((100, 4)), fusedlstm.LSTM(2), keras.layers.Dense(1)])
    lstm = model.layers[0]
    assert lstm.count_params() == 56 == 4 * ((4 + 2) * 2 + 2)
    assert model.count_params() == 59
    assert [tuple(w.shape) for w in lstm.get_weights()] == [(4, 8), (2, 8), (8,)]


def test_worked_example_48_parameters():
    model = keras.Sequential([keras.Input((40, 3)), fusedlstm.LSTM(2)])
    assert model.count_params() == 48 == 4 * ((3 + 2) * 2 + 2)


@pytest.mark.parametrize("units,features", [(1, 1), (3, 4), (31, 13)])
def test_parameter_count_matches_stock(units, features):
    stock, fused = make_pair(units=units)
    stock.build((None, 9, features))
    fused.build((None, 9, features))
    assert fused.count_params() == stock.count_params() == 4 * ((features + units) * units + units)


def one_step_states(kernel_block=None):
    """(h, c) after one step from c0 = 1, with x = 1 and one kernel block set to 3."""
    units = 2
    layer = fusedlstm.LSTM(units, return_state=True, use_fused=True)
    layer.build((None, 1, 1))
    kernel = np.zeros((1, 4 * units), "float32")
    if kernel_block is not None:
        kernel[:, kernel_block * units:(kernel_block + 1) * units] = 3.0
    bias = np.full(4 * units, 0.5, "float32")
    layer.set_weights([kernel, np.zeros((units, 4 * units), "float32"), bias])
    x = np.ones((1, 1, 1), "float32")
    h0 = np.zeros((1, units), "float32")
    c0 = np.ones((1, units), "float32")
    _, h, c = layer(x, initial_state=[h0, c0])
    return to_numpy(h)[0, 0], to_numpy(c)[0, 0]


def expected_states(moved_gate):
    """(h, c) of one LSTM step where only `moved_gate` sees pre-activation 3.5, not 0.5."""
    pre = {gate: 0.5 for gate in "ifco"}
    if moved_gate:
        pre[moved_gate] = 3.5
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    i, f, o = sigmoid(pre["i"]), sigmoid(pre["f"]), sigmoid(pre["o"])
    c = f * 1.0 + i * np.tanh(pre["c"])
    return o * np.tanh(c), c


@pytest.mark.parametrize("block,gate", list(enumerate("ifco")))
def test_kernel_column_blocks_are_gates_i_f_c_o(block, gate):
    h, c = one_step_states(block)
    for candidate in "ifco":
        want_h, want_c = expected_states(candidate)
        matches = abs(h - want_h) < 1e-5 and abs(c - want_c) < 1e-5
        assert matches == (candidate == gate), (block, candidate)
    assert (h, c) != pytest.approx(one_step_states(None))
