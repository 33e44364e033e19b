"""Bad input gets a clear ValueError naming what was expected and what was received."""

import keras
import numpy as np
import pytest

import fusedlstm
from helpers import make_pair, to_numpy

X = np.random.default_rng(0).normal(size=(2, 5, 3)).astype("float32")


@pytest.fixture
def built():
    layer = fusedlstm.LSTM(4, return_sequences=True)
    layer(X)
    return layer


@pytest.mark.parametrize("shape", [(2, 3), (2, 5, 3, 1)])
def test_inputs_of_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"expected ndim=3, found ndim=\d"):
        fusedlstm.LSTM(4)(np.zeros(shape, "float32"))


def test_feature_size_differs_from_built_kernel(built):
    with pytest.raises(ValueError, match=r"built for inputs with 3 features.*\(2, 5, 4\)"):
        built(np.zeros((2, 5, 4), "float32"))


def test_mask_of_wrong_shape(built):
    with pytest.raises(ValueError, match=r"mask of shape \(batch_size, timesteps\) = \(2, 5\)"
                                         r".*\(2, 4\)"):
        built(X, mask=np.ones((2, 4), bool))


def test_initial_state_count(built):
    with pytest.raises(ValueError, match=r"expects 2 initial states.*Received 1 state"):
        built(X, initial_state=[np.zeros((2, 4), "float32")])


def test_initial_state_shape(built):
    with pytest.raises(ValueError, match=r"initial state c of shape.*\(2, 4\).*\(2, 5\)"):
        built(X, initial_state=[np.zeros((2, 4), "float32"), np.zeros((2, 5), "float32")])


@pytest.mark.parametrize("value", ["yes", 1, None, "Auto"])
def test_use_fused_values(value):
    with pytest.raises(ValueError, match=r"`use_fused`.*Expected one of.*Received: use_fused="):
        fusedlstm.LSTM(4, use_fused=value)


@pytest.mark.parametrize("units", [0, -3, 2.5, "4", None, True])
def test_units_values(units):
    with pytest.raises(ValueError, match=r"`units`, expected a positive integer, got"):
        fusedlstm.LSTM(units)


def test_zero_length_sequence():
    x = np.zeros((2, 0, 3), "float32")
    with pytest.raises(Exception):
        keras.layers.LSTM(4)(x)
    with pytest.raises(ValueError, match=r"at least one timestep.*\(2, 0, 3\)"):
        fusedlstm.LSTM(4)(x)


def test_empty_batch_behaves_as_stock():
    x = np.zeros((0, 5, 3), "float32")
    stock, fused = make_pair(units=4, return_sequences=True, return_state=True)
    try:
        want = [to_numpy(t).shape for t in stock(x)]
    except Exception as error:
        with pytest.raises(type(error)):
            fused(x)
    else:
        assert [to_numpy(t).shape for t in fused(x)] == want


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_propagate_as_in_stock(bad):
    x = X.copy()
    x[0, 2, 1] = bad
    stock, fused = make_pair(units=4, return_sequences=True)
    want, got = to_numpy(stock(x)), to_numpy(fused(x))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=1e-5)
