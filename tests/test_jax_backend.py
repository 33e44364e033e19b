"""JAX-specific checks of `fusedlstm.LSTM` (`KERAS_BACKEND=jax`).

A pytest process has one Keras backend, fixed at import, so this module skips
itself under any other backend. CI runs the suite a third time with
`KERAS_BACKEND=jax`; the backend-agnostic tests run in every pass, and this
module adds what only JAX has: the op as XLA custom calls inside `jax.jit`,
`jax.grad` and `jax.vmap`, Keras's trainer compiling the fused model with
XLA, the GPU decision, and the host route a JAX GPU takes with
`FUSEDLSTM_KERNEL=cuda` (run here on the CPU, its CUDA branch in the Numba
CUDA simulator in a subprocess).

    KERAS_BACKEND=jax python -m pytest tests/test_jax_backend.py -q
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("needs KERAS_BACKEND=jax", allow_module_level=True)

import jax
import jax.numpy as jnp

import fusedlstm
import fusedlstm.ops
from fusedlstm import layer as fused_layer
from fusedlstm.backends import jax as ops_jax
from fusedlstm.kernels.gates import ACTIVATION_CODES
from helpers import make_mask, make_pair, run_with_grads, simulated_cuda_errors

OUTPUT_ATOL = 1e-5
GRAD_ATOL = 1e-4
CONFIG = fusedlstm.ops.RecurrenceConfig(
    activation=ACTIVATION_CODES["tanh"], recurrent_activation=ACTIVATION_CODES["sigmoid"],
    zero_output_for_mask=False, training=True)



def op_arguments(rng, steps=6, batch=4, features=3, units=5, masked=True):
    """Arguments of `ops_jax.lstm_sequence` after the config, as NumPy arrays."""
    normal = rng.standard_normal
    arrays = [normal((batch, steps, features)), normal((features, 4 * units)) * 0.4,
              normal(4 * units) * 0.1, normal((units, 4 * units)) * 0.4,
              normal((batch, units)), normal((batch, units))]
    mask = make_mask("holes", batch, steps, rng) if masked else None
    return [a.astype("float32") for a in arrays] + [mask, None, None]


def probe_loss(args):
    outputs, h_n, c_n = ops_jax.lstm_sequence(*args, CONFIG)
    return jnp.sum(jnp.sin(outputs)) + jnp.sum(h_n * c_n)


def test_op_lowers_to_xla_custom_calls():
    args = op_arguments(np.random.default_rng(0))
    grad = jax.jit(jax.grad(lambda *diff: probe_loss([*diff, *args[6:]]), argnums=range(6)))
    hlo = grad.lower(*args[:6]).as_text()
    assert "fusedlstm_layer_forward" in hlo and "fusedlstm_layer_backward" in hlo
    assert "callback" not in hlo
    # The whole layer is in the calls: no projection or weight gradient around them.
    assert "dot_general" not in hlo and "transpose" not in hlo


def test_jit_and_grad_match_eager():
    args = op_arguments(np.random.default_rng(1))
    loss = lambda *diff: probe_loss([*diff, *args[6:]])  # noqa: E731
    eager = jax.value_and_grad(loss, argnums=range(6))(*args[:6])
    jitted = jax.jit(jax.value_and_grad(loss, argnums=range(6)))(*args[:6])
    for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-5, atol=1e-6)


def test_vmap_runs_one_call_per_element():
    args = op_arguments(np.random.default_rng(2), masked=False)
    xs = np.stack([args[0], 2 * args[0], -args[0]])
    run = lambda x: ops_jax.lstm_sequence(x, *args[1:], CONFIG)  # noqa: E731
    batched = jax.jit(jax.vmap(run))(xs)
    for k, x in enumerate(xs):
        for got, want in zip(batched, run(x)):
            np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want), atol=1e-6)


def training_data(rng, batch=32, steps=8, features=3):
    x = rng.standard_normal((batch, steps, features)).astype("float32")
    y = rng.standard_normal((batch, 1)).astype("float32")
    return x, y


def fitted(layer_factory, x, y, jit_compile, epochs=3):
    keras.utils.set_random_seed(11)
    model = keras.Sequential([keras.Input(x.shape[1:]), layer_factory(),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return model, history.history["loss"]


@pytest.mark.parametrize("wrapper", [None, keras.layers.Bidirectional], ids=["plain", "bidir"])
def test_keras_compiles_the_fused_model_with_xla(fused_calls, wrapper):
    x, y = training_data(np.random.default_rng(3))
    kwargs = {"dropout": 0.1, "recurrent_dropout": 0.2, "seed": 4}

    def factory(cls):
        return lambda: cls(6, **kwargs) if wrapper is None else wrapper(cls(6, **kwargs))

    _, stock_losses = fitted(factory(keras.layers.LSTM), x, y, jit_compile=True)
    fused_calls.clear()
    model, fused_losses = fitted(factory(fusedlstm.LSTM), x, y, jit_compile="auto")
    assert model.jit_compile is True
    assert fused_calls, "the fused op never ran"
    np.testing.assert_allclose(fused_losses, stock_losses, rtol=1e-4)
    predicted = model.predict(x, batch_size=8, verbose=0)
    np.testing.assert_allclose(predicted, np.asarray(model(x)), atol=OUTPUT_ATOL)
    assert np.isfinite(model.evaluate(x, y, verbose=0))


def test_gpu_keeps_cudnn_unless_cuda_kernels_are_asked_for(monkeypatch):
    monkeypatch.setattr(fused_layer, "_jax_on_accelerator", lambda: True)
    monkeypatch.delenv("FUSEDLSTM_KERNEL", raising=False)
    assert "cuDNN" in fusedlstm.LSTM(3).fused_unsupported_reason()
    with pytest.raises(ValueError, match="FUSEDLSTM_KERNEL=cuda"):
        fusedlstm.LSTM(3, use_fused=True)
    monkeypatch.setenv("FUSEDLSTM_KERNEL", "cuda")
    assert fusedlstm.LSTM(3).fused_unsupported_reason() is None


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_host_route_matches_the_custom_calls(monkeypatch, masked):
    args = op_arguments(np.random.default_rng(5), masked=masked)
    loss = jax.jit(jax.value_and_grad(lambda *diff: probe_loss([*diff, *args[6:]]),
                                      argnums=range(6)))
    expected = loss(*args[:6])
    monkeypatch.setattr(ops_jax, "_on_cpu", lambda array: False)
    loss = jax.jit(jax.value_and_grad(lambda *diff: probe_loss([*diff, *args[6:]]),
                                      argnums=range(6)))
    assert "callback" in loss.lower(*args[:6]).as_text()
    for got, want in zip(jax.tree.leaves(loss(*args[:6])), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_cuda_kernel_branch_in_the_simulator():
    errors = simulated_cuda_errors("jax", ["saved", "masked_dropouts"])
    for case, (output_error, grad_error) in errors.items():
        assert output_error <= OUTPUT_ATOL, case
        assert grad_error <= GRAD_ATOL, case


def test_masked_rows_output_the_initial_state_as_keras_jax_does():
    rng = np.random.default_rng(6)
    stock, fused = make_pair(units=4, return_sequences=True)
    x = rng.standard_normal((3, 5, 2)).astype("float32")
    mask = np.ones((3, 5), bool)
    mask[1, :3] = False
    mask[2] = False
    states = [rng.standard_normal((3, 4)).astype("float32") for _ in "hc"]
    (stock_out,), _ = run_with_grads(stock, x, mask, states)
    (fused_out,), _ = run_with_grads(fused, x, mask, states)
    np.testing.assert_allclose(fused_out[2], np.broadcast_to(states[0][2], (5, 4)), atol=0)
    np.testing.assert_allclose(fused_out, stock_out, atol=OUTPUT_ATOL)


def test_a_failing_handler_raises_its_python_error():
    args = op_arguments(np.random.default_rng(7), masked=False)
    ops_jax._register_targets()
    shapes = [jax.ShapeDtypeStruct((6, 4, 5), jnp.float32)]
    call = jax.ffi.ffi_call(ops_jax._LAYER_FORWARD_TARGET, shapes, vmap_method="sequential")
    with pytest.raises(Exception, match="KeyError: 'activation'"):
        jax.block_until_ready(call(*args[:6], jnp.zeros((0, 4), bool),
                                   *[jnp.zeros((0, 0, 0), jnp.float32)] * 2, save=np.int32(0)))
