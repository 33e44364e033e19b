"""JAX speed: fusedlstm.LSTM against keras.layers.LSTM on Keras's JAX backend.

Both layers run jitted (`jax.jit` around `stateless_call`, as Keras's JAX
trainer does): `fwd` is `training=False`, `train` the gradient of a sum of
squares with respect to the three weights. Run one framework per process
(`--framework fusedlstm|keras`) with `KERAS_BACKEND=jax`; `run_jax.py` runs
both and writes the comparison.
"""

import os

import numpy as np
import pytest

import cases

if os.environ.get("KERAS_BACKEND") != "jax":
    pytest.skip("needs KERAS_BACKEND=jax", allow_module_level=True)

import jax
import jax.numpy as jnp
import keras

import fusedlstm


def make_jitted(layer_class, shape, mode, case):
    """A jitted step of `layer_class` holding the case's weights; blocks on its result."""
    x, mask, weights = cases.problem(shape, case)
    kwargs = {"recurrent_dropout": 0.2} if case == "recurrent_dropout" else {}
    layer = layer_class(shape[3], return_sequences=True, **kwargs)
    layer.build(x.shape)
    layer.set_weights(weights)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    x_j = jnp.asarray(x)
    mask_j = None if mask is None else jnp.asarray(mask)

    def call(trainable, x, training):
        return layer.stateless_call(trainable, non_trainable, x, mask=mask_j,
                                    training=training)[0]

    forward = jax.jit(lambda trainable, x: call(trainable, x, False))
    train_step = jax.jit(jax.grad(lambda trainable, x: jnp.sum(call(trainable, x, True) ** 2)))
    cases.check_against_reference(np.asarray(forward(trainable, x_j)), x, mask, weights)
    step = train_step if mode == "train" else forward
    return lambda: jax.block_until_ready(step(trainable, x_j))


@pytest.mark.parametrize("case", cases.CASES)
@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("shape", sorted(cases.SHAPES))
def test_lstm_speed_jax(benchmark, framework, shape, mode, case):
    if framework == "torch":
        pytest.skip("torch.nn.LSTM is timed by test_cpu_lstm.py")
    layer_class = fusedlstm.LSTM if framework == "fusedlstm" else keras.layers.LSTM
    run = make_jitted(layer_class, cases.SHAPES[shape], mode, case)
    benchmark.group = f"{shape}/{mode}/{case}"
    benchmark.name = framework
    benchmark.extra_info.update(
        framework=framework, shape=shape, mode=mode, case=case, NTCH=cases.SHAPES[shape],
        keras=keras.__version__, jax=jax.__version__)
    benchmark.pedantic(run, rounds=7, warmup_rounds=2, iterations=1)
