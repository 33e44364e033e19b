"""JAX speed: fusedlstm.LSTM against keras.layers.LSTM on Keras's JAX backend.

Both layers run jitted (`jax.jit` around `stateless_call`, as Keras's JAX
trainer does): `fwd` is `training=False`, `train` the gradient of a sum of
squares with respect to the three weights; the plain rows only. Run one layer
per process (`--framework fusedlstm|keras`) with `KERAS_BACKEND=jax`;
`run_cpu.py` runs both with the other implementations and writes the comparison.
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
    layer, x, mask, weights = cases.keras_layer(layer_class, shape, case)
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


@pytest.mark.parametrize("shape,mode", [(s, m) for s, m, case in cases.ROWS
                                         if case == "plain"])
def test_lstm_speed_jax(benchmark, framework, shape, mode):
    if framework not in ("fusedlstm", "keras"):
        pytest.skip(f"{framework} is timed by test_cpu_lstm.py")
    if framework == "fusedlstm":
        cases.load_fused_kernels()
    layer_class = fusedlstm.LSTM if framework == "fusedlstm" else keras.layers.LSTM
    run = make_jitted(layer_class, cases.SHAPES[shape], mode, "plain")
    benchmark.group = f"{shape}/{mode}/plain"
    benchmark.name = f"jax/{framework}"
    benchmark.extra_info.update(
        implementation=f"jax/{framework}", framework=framework, shape=shape, mode=mode,
        case="plain", NTCH=cases.SHAPES[shape], flops=cases.layer_flops(cases.SHAPES[shape], mode),
        threads=threads_used(framework))
    benchmark.pedantic(run, rounds=cases.ROUNDS, warmup_rounds=cases.WARMUP_ROUNDS,
                       iterations=1)


def threads_used(framework):
    """The fused kernels' threads; XLA's CPU client sizes its pool to the machine."""
    if framework != "fusedlstm":
        return {}
    from fusedlstm.kernels.cpu.threads import thread_count

    return {"fusedlstm_kernels": thread_count()}
