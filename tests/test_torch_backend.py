"""PyTorch-specific checks of `fusedlstm.LSTM` (`KERAS_BACKEND=torch`).

A pytest process has one Keras backend, fixed at import, so this module skips
itself under any other backend. CI runs the suite a second time with
`KERAS_BACKEND=torch`; the backend-agnostic parity tests run in both passes,
and this module adds what only the torch backend has: second-order
gradients (a clear error), Keras's symbolic calls on "meta" tensors, training
and wrappers under torch. Gradients, masks and dropouts against the stock
layer are `test_parity.py`'s, which runs on this backend too. The CUDA branch
(device arrays in, weight gradients as torch ops) runs here in the Numba CUDA
simulator, in a subprocess.

    KERAS_BACKEND=torch python -m pytest tests/test_torch_backend.py -q
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "torch":
    pytest.skip("needs KERAS_BACKEND=torch", allow_module_level=True)

import torch

import fusedlstm
from fusedlstm import ops as fused_ops
from fusedlstm.backends import torch as ops_torch
from helpers import make_mask, make_pair, run_with_grads, simulated_cuda_errors

OUTPUT_ATOL = 1e-5
GRAD_ATOL = 1e-4


def assert_all_close(actual, expected, atol, what):
    assert len(actual) == len(expected), what
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what} {k}: shape {a.shape} != {e.shape}"
        error = np.abs(a.astype(np.float64) - e).max(initial=0)
        assert error <= atol, f"{what} {k}: max error {error:.3g} > {atol}"


def assert_matches_stock(stock, fused, x, **call):
    stock_out, stock_grads = run_with_grads(stock, x, **call)
    fused_out, fused_grads = run_with_grads(fused, x, **call)
    assert_all_close(fused_out, stock_out, OUTPUT_ATOL, "output")
    assert_all_close([fused_grads[k] for k in stock_grads], list(stock_grads.values()),
                     GRAD_ATOL, "gradient")


def random_inputs(rng, batch, steps, features):
    return rng.standard_normal((batch, steps, features)).astype("float32")


def test_second_order_gradient_is_a_clear_error():
    """create_graph=True through the fused op raises at the first backward, naming
    use_fused=False, where the stock layer differentiates twice."""
    rng = np.random.default_rng(1)
    stock, fused = make_pair(units=3)
    x = torch.tensor(random_inputs(rng, 2, 4, 3), requires_grad=True)
    stock(x)
    fused(x)
    fused.set_weights(stock.get_weights())
    (d_x,) = torch.autograd.grad(stock(x).square().sum(), x, create_graph=True)
    (d2_x,) = torch.autograd.grad(d_x.square().sum(), x)
    assert torch.isfinite(d2_x).all() and d2_x.abs().sum() > 0
    with pytest.raises(RuntimeError, match=r"second-order gradient.*use_fused=False"):
        torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    (first,) = torch.autograd.grad(fused(x).square().sum(), x)  # plain gradients still work
    (want,) = torch.autograd.grad(stock(x).square().sum(), x)
    np.testing.assert_allclose(first.numpy(), want.detach().numpy(), atol=1e-5)


def test_bidirectional_matches_stock_layer():
    rng = np.random.default_rng(4)
    keras.utils.set_random_seed(5)
    stock = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True))
    keras.utils.set_random_seed(5)
    fused = keras.layers.Bidirectional(fusedlstm.LSTM(4, return_sequences=True))
    assert_matches_stock(stock, fused, random_inputs(rng, 3, 7, 2),
                         mask=make_mask("left", 3, 7, rng))


def test_symbolic_call_runs_no_kernel(monkeypatch):
    def no_kernel(data_on_gpu):
        raise AssertionError("a symbolic call launched a kernel")

    monkeypatch.setattr(ops_torch, "select_kernels", no_kernel)
    layer = fusedlstm.LSTM(3, return_sequences=True, return_state=True)
    outputs = layer(keras.Input((None, 2)))
    assert [tuple(o.shape) for o in outputs] == [(None, None, 3), (None, 3), (None, 3)]

    batch, steps, features, units = 2, 7, 5, 3
    shapes = [(batch, steps, features), (features, 4 * units), (4 * units,),
              (units, 4 * units), (batch, units), (batch, units)]
    tensors = [torch.empty(s, device="meta") for s in shapes]
    config = fused_ops.RecurrenceConfig(0, 1, False, True)
    results = ops_torch.lstm_sequence(*tensors, None, None, None, config)
    assert [tuple(r.shape) for r in results] == [(batch, steps, units), (batch, units),
                                                (batch, units)]
    assert all(r.is_meta for r in results)


def small_model(layer_class, seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((6, 3)),
        layer_class(8, recurrent_dropout=0.25, seed=3),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def test_fit_one_epoch_matches_stock_model():
    rng = np.random.default_rng(6)
    x = random_inputs(rng, 32, 6, 3)
    y = rng.standard_normal((32, 1)).astype("float32")
    histories, weights = [], []
    for layer_class in (keras.layers.LSTM, fusedlstm.LSTM):
        model = small_model(layer_class, seed=7)
        keras.utils.set_random_seed(8)
        history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        histories.append(history.history["loss"])
        weights.append(model.get_weights() + [model.predict(x, verbose=0)])
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-5)
    assert_all_close(weights[1], weights[0], GRAD_ATOL, "weight after one epoch")


def test_cuda_kernel_branch_in_the_simulator():
    errors = simulated_cuda_errors("torch", ["saved", "recomputed", "masked_dropouts"])
    for case, (output_error, grad_error) in errors.items():
        assert output_error <= OUTPUT_ATOL, case
        assert grad_error <= GRAD_ATOL, case
