"""Streaming: a stateful layer fed one timestep per call matches the stock layer."""

import keras
import numpy as np
import pytest

from helpers import make_pair, to_numpy

# On JAX, Keras's compiled predict drops a stateful RNN's state updates (its
# states are not tracked variables; the stock layer's too), so JAX streams in
# eager calls.
JAX = keras.backend.backend() == "jax"
CALLS, RESET_EVERY = 200, 50


@pytest.mark.parametrize("use_fused", ["auto", True])
def test_stateful_one_step_per_call_matches_stock(use_fused):
    """200 consecutive calls with T = 1 and `reset_states` every 50, against the
    stock layer streamed the same way and against the stock layer run on each
    50-step segment whole. "auto" runs the step as the cell's ops, True the kernel."""
    stock, fused = make_pair(units=5, stateful=True, return_sequences=True)
    fused.use_fused = use_fused
    # As served: a model, compiled once (jit on JAX), one predict_on_batch per step.
    models = [keras.Sequential([keras.Input(batch_shape=(2, 1, 3)), layer])
              for layer in (stock, fused)]
    fused.set_weights(stock.get_weights())
    whole = keras.layers.LSTM(5, return_sequences=True)
    whole.build((2, RESET_EVERY, 3))
    whole.set_weights(stock.get_weights())
    x = np.random.default_rng(0).standard_normal((2, CALLS, 3)).astype("float32")
    streamed = {"stock": [], "fused": []}
    for step in range(CALLS):
        if step and step % RESET_EVERY == 0:
            stock.reset_states()
            fused.reset_states()
        for name, model in zip(streamed, models):
            step_input = x[:, step:step + 1]
            streamed[name].append(to_numpy(model(step_input) if JAX
                                           else model.predict_on_batch(step_input)))
    stock_out, fused_out = (np.concatenate(streamed[n], axis=1) for n in ("stock", "fused"))
    segments = np.concatenate([to_numpy(whole(x[:, s:s + RESET_EVERY]))
                               for s in range(0, CALLS, RESET_EVERY)], axis=1)
    np.testing.assert_allclose(stock_out, segments, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fused_out, stock_out, rtol=0, atol=1e-5)
    np.testing.assert_allclose(to_numpy(fused.states[1]), to_numpy(stock.states[1]),
                               rtol=0, atol=1e-5)
