"""Bad input gets a clear ValueError naming what was expected and what was received."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import fusedlstm
from helpers import make_pair, run_with_grads, to_numpy

BACKEND = keras.backend.backend()
ON_TF = BACKEND == "tensorflow"

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


def test_empty_batch_runs_fused_and_matches_stock_shapes(fused_calls):
    x = np.zeros((0, 5, 3), "float32")
    stock, fused = make_pair(units=4, return_sequences=True, return_state=True)
    want = [(0, 5, 4), (0, 4), (0, 4)]
    try:
        assert [to_numpy(t).shape for t in stock(x)] == want
    except Exception as error:  # noqa: BLE001 -- TF's eager stock loop: "Biases must be 1D"
        assert ON_TF and "Biases must be 1D" in str(error)
    assert [to_numpy(t).shape for t in fused(x)] == want
    assert fused_calls
    outputs, grads = run_with_grads(fused, x, training=True)
    assert [o.shape for o in outputs] == want
    assert grads["kernel"].shape == (3, 16) and not grads["kernel"].any()


_EMPTY_BATCH_SCRIPT = """
import numpy as np
import tensorflow as tf
import fusedlstm
layer = fusedlstm.LSTM(4, return_sequences=True, return_state=True, use_fused=True)
layer(np.zeros((2, 5, 3), "float32"))

@tf.function(input_signature=[tf.TensorSpec([None, None, 3])])
def step(x):
    with tf.GradientTape() as tape:
        outputs = layer(x, training=True)
        loss = tf.add_n([tf.reduce_sum(o) for o in outputs])
    return outputs, tape.gradient(loss, layer.trainable_weights)

outputs, grads = step(np.zeros((0, 5, 3), "float32"))
print([tuple(o.shape) for o in outputs], [tuple(g.shape) for g in grads])
"""


@pytest.mark.skipif(not ON_TF, reason="a None batch dimension is TensorFlow's tf.function")
def test_empty_batch_inside_tf_function_returns():
    """N=0 at run time, under a trace with a None batch: it once waited forever."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        result = subprocess.run([sys.executable, "-c", _EMPTY_BATCH_SCRIPT], capture_output=True,
                                text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("an empty batch inside tf.function did not return within 180 s")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == (
        "[(0, 5, 4), (0, 4), (0, 4)] [(3, 16), (4, 16), (16,)]")


def traced(layer, with_mask=False, with_state=False):
    """`layer` called in a tf.function whose every dimension is None."""
    import tensorflow as tf

    signature = [tf.TensorSpec([None, None, 3])]
    if with_mask:
        signature.append(tf.TensorSpec([None, None], tf.bool))
    if with_state:
        signature += [tf.TensorSpec([None, None]), tf.TensorSpec([None, None])]

    @tf.function(input_signature=signature)
    def call(x, *rest):
        mask = rest[0] if with_mask else None
        state = list(rest[-2:]) if with_state else None
        return layer(x, mask=mask, initial_state=state)

    return call


# name: (mask, h0, c0, expected message); None: the input is well formed.
BAD_AT_RUN_TIME = {
    "mask_two_of_three_rows": (np.ones((2, 5), bool), None, None,
                               r"mask of shape.*\[3 5\].*Received: mask.shape=\] \[2 5\]"),
    "mask_shorter": (np.ones((3, 4), bool), None, None,
                     r"mask of shape.*\[3 5\].*Received: mask.shape=\] \[3 4\]"),
    "state_fewer_rows": (None, np.ones((2, 4), "float32"), np.ones((2, 4), "float32"),
                         r"initial state h of shape.*Received: shape=\] \[2 4\]"),
    "state_wrong_units": (None, np.ones((3, 4), "float32"), np.ones((3, 5), "float32"),
                          r"initial state c of shape \(batch_size, units\).*, 4\) or \(1, 4\)"
                          r".*Received: shape=\] \[3 5\]"),
}


@pytest.mark.skipif(not ON_TF, reason="only TensorFlow traces with unknown dimensions")
@pytest.mark.parametrize("case", sorted(BAD_AT_RUN_TIME))
def test_bad_shapes_at_run_time_raise(case):
    """Out-of-bounds shapes that only the run can see raise (as the stock layer's ops
    do) instead of reading past the buffers."""
    import tensorflow as tf

    mask, h0, c0, message = BAD_AT_RUN_TIME[case]
    layer = fusedlstm.LSTM(4, return_sequences=True, use_fused=True)
    layer(X)
    x = np.random.default_rng(1).normal(size=(3, 5, 3)).astype("float32")
    args = [x] + ([mask] if mask is not None else []) + ([h0, c0] if h0 is not None else [])
    call = traced(layer, with_mask=mask is not None, with_state=h0 is not None)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        call(*args)


@pytest.mark.skipif(not ON_TF, reason="only TensorFlow traces with unknown dimensions")
def test_empty_sequence_at_run_time_raises_as_stock():
    import tensorflow as tf

    layer = fusedlstm.LSTM(4, use_fused=True)
    layer(X)
    stock = keras.layers.LSTM(4)
    stock(X)
    x = np.zeros((2, 0, 3), "float32")
    with pytest.raises(tf.errors.InvalidArgumentError):
        traced(stock)(x)
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least one timestep"):
        traced(layer)(x)


def one_row_inputs():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5, 3)).astype("float32")
    mask = np.array([[True, True, False, True, False]])
    state = [rng.normal(size=(1, 4)).astype("float32") for _ in "hc"]
    return x, mask, state


@pytest.mark.parametrize("what", ["mask", "state", "state_recurrent_dropout"])
@pytest.mark.parametrize("traced_call", [False, True], ids=["eager", "tf_function"])
def test_one_row_mask_or_state_broadcasts_as_stock(fused_calls, what, traced_call):
    if traced_call and not ON_TF:
        pytest.skip("tf.function is TensorFlow's")
    x, mask, state = one_row_inputs()
    kwargs = {"recurrent_dropout": 0.3, "seed": 4} if what.endswith("dropout") else {}
    stock, fused = make_pair(units=4, return_sequences=True, return_state=True, **kwargs)
    call = {"mask": mask} if what == "mask" else {"initial_state": state}
    training = bool(kwargs)
    if what != "mask" and BACKEND == "jax":
        with pytest.raises(Exception):  # noqa: B017 -- JAX's scan refuses the carry: TypeError
            stock(x, **call)
        with pytest.raises(ValueError, match=r"initial state h of shape.*Received: shape=\(1, 4\)"):
            fused(x, **call)
        return
    results = []
    for layer in (stock, fused):
        keras.utils.set_random_seed(9)
        if traced_call:
            layer(x)  # build outside the trace
            function = traced(layer, with_mask="mask" in call, with_state="initial_state" in call)
            args = [x] + ([mask] if "mask" in call else state)
            results.append([to_numpy(t) for t in function(*args)])
        else:
            results.append([to_numpy(t) for t in layer(x, training=training, **call)])
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert fused_calls


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_propagate_as_in_stock(bad):
    x = X.copy()
    x[0, 2, 1] = bad
    stock, fused = make_pair(units=4, return_sequences=True)
    want, got = to_numpy(stock(x)), to_numpy(fused(x))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    # The bad value reaches only its own row, from its own step on: the other row and
    # the steps before it stay finite and equal to stock's.
    assert np.isfinite(got[0, :2]).all() and np.isfinite(got[1]).all()
    if np.isnan(bad):
        assert np.isnan(got[0, 2:]).all()
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=1e-5)
