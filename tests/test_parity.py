"""Outputs, states and every gradient of fusedlstm.LSTM against keras.layers.LSTM
holding the same weights and against a float64 NumPy reference."""

import zlib

import numpy as np
import pytest

import reference
from helpers import make_mask, make_pair, run_with_grads

# (batch, timesteps, input dim, units): every value of each axis appears.
SIZES = [(1, 1, 1, 1), (5, 7, 4, 3), (32, 64, 13, 31), (5, 64, 1, 128),
         (1, 7, 13, 128), (32, 1, 4, 31)]

# name: (layer kwargs, call options)
FLAGS = {
    "default": ({}, {}),
    "return_sequences": ({"return_sequences": True}, {}),
    "return_state": ({"return_sequences": True, "return_state": True}, {}),
    "go_backwards": ({"go_backwards": True, "return_sequences": True}, {}),
    "no_bias": ({"use_bias": False}, {}),
    "no_unit_forget_bias": ({"unit_forget_bias": False, "return_state": True}, {}),
    "initial_state": ({"return_state": True}, {"initial_state": True}),
    "mask_right": ({"return_sequences": True}, {"mask": "right"}),
    "mask_left": ({"return_sequences": True}, {"mask": "left", "initial_state": True}),
    "mask_holes": ({"return_sequences": True, "return_state": True}, {"mask": "holes"}),
    "mask_zero_output": ({"return_sequences": True, "zero_output_for_mask": True},
                         {"mask": "holes"}),
    "mask_backwards": ({"return_sequences": True, "go_backwards": True}, {"mask": "holes"}),
    "dropout": ({"dropout": 0.3, "seed": 5, "return_sequences": True}, {"training": True}),
    "recurrent_dropout": ({"recurrent_dropout": 0.3, "seed": 5, "return_sequences": True},
                          {"training": True}),
    "both_dropouts_masked": ({"dropout": 0.2, "recurrent_dropout": 0.4, "seed": 5,
                              "return_state": True},
                             {"training": True, "mask": "holes", "initial_state": True}),
    "softsign_hard_sigmoid": ({"activation": "softsign", "recurrent_activation": "hard_sigmoid",
                               "return_sequences": True}, {}),
    "relu_sigmoid": ({"activation": "relu", "return_state": True}, {}),
    "linear_tanh": ({"activation": "linear", "recurrent_activation": "tanh"}, {}),
    "implementation_1": ({"implementation": 1, "return_sequences": True}, {"mask": "left"}),
}


def randomize_weights(layer, features, rng):
    units = layer.units
    weights = [rng.normal(0, 0.6 / np.sqrt(features), (features, 4 * units)),
               rng.normal(0, 0.6 / np.sqrt(units), (units, 4 * units))]
    if layer.use_bias:
        weights.append(rng.normal(0, 0.5, 4 * units))
    return [w.astype("float32") for w in weights]


def record_dropout_masks(layer):
    """Keeps every dropout mask the cell draws, in the order drawn."""
    drawn = []
    create = layer.cell._create_dropout_mask

    def recording(step_input, rate):
        masks = create(step_input, rate)
        drawn.append([np.asarray(m) for m in (masks if isinstance(masks, list) else [masks])])
        return masks

    layer.cell._create_dropout_mask = recording
    return drawn


def reference_masks(layer, drawn, training):
    """The [4, N, C] input and [4, N, H] recurrent masks for the float64 reference."""
    cell = layer.cell
    input_masks = recurrent_masks = None
    if not training:
        return None, None
    remaining = list(drawn)
    if cell.dropout > 0:
        masks = remaining.pop(0)
        input_masks = np.stack(masks * (4 // len(masks)))
    if cell.recurrent_dropout > 0:
        masks = remaining.pop(0)
        recurrent_masks = np.stack(masks * (4 // len(masks)))
    return input_masks, recurrent_masks


def reference_run(layer, drawn, weights, x, mask, states, kwargs, training, seed):
    """Float64 outputs and gradients for the same probe loss as `run_with_grads`."""
    input_masks, recurrent_masks = reference_masks(layer, drawn, training)
    bias = weights[2] if layer.use_bias else None
    h0, c0 = states if states is not None else (None, None)
    act = kwargs.get("activation", "tanh")
    ract = kwargs.get("recurrent_activation", "sigmoid")
    zero_output = kwargs.get("zero_output_for_mask", False)
    seq, h, c, tape = reference.lstm_forward(
        x, weights[0], weights[1], bias, h0, c0, mask, recurrent_masks, input_masks,
        act, ract, kwargs.get("go_backwards", False), zero_output)
    outputs = [seq if layer.return_sequences else seq[:, -1]]
    if layer.return_state:
        outputs += [h, c]
    rng = np.random.default_rng(seed)
    probes = [rng.standard_normal(o.shape).astype("float32") for o in outputs]
    d_seq = np.zeros_like(seq)
    if layer.return_sequences:
        d_seq += probes[0]
    else:
        d_seq[:, -1] = probes[0]
    d_h = probes[1] if layer.return_state else np.zeros_like(h)
    d_c = probes[2] if layer.return_state else np.zeros_like(c)
    grads = reference.lstm_backward(tape, d_seq, d_h, d_c, act, ract, zero_output)
    return outputs, grads


def assert_close_to_stock_and_reference(name, fused, stock, ref, atol):
    fused, stock, ref = (np.asarray(a, np.float64) for a in (fused, stock, ref))
    assert fused.shape == stock.shape, name
    fused_vs_stock = np.abs(fused - stock).max(initial=0)
    fused_vs_ref = np.abs(fused - ref).max(initial=0)
    stock_vs_ref = np.abs(stock - ref).max(initial=0)
    assert fused_vs_stock <= atol, f"{name}: fused vs stock {fused_vs_stock:.3g} > {atol}"
    assert fused_vs_ref <= 2 * stock_vs_ref + 1e-6, (
        f"{name}: fused vs float64 {fused_vs_ref:.3g} > 2 x stock's {stock_vs_ref:.3g} + 1e-6")


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N%d-T%d-C%d-H%d" % s)
@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_matches_stock_layer_and_float64_reference(flag, size):
    kwargs, options = FLAGS[flag]
    batch, steps, features, units = size
    rng = np.random.default_rng(zlib.crc32(f"{flag}{size}".encode()))
    stock, fused = make_pair(units=units, random_seed=7, **kwargs)
    x = rng.normal(size=(batch, steps, features)).astype("float32")
    mask = make_mask(options["mask"], batch, steps, rng) if "mask" in options else None
    states = None
    if options.get("initial_state"):
        states = [rng.normal(size=(batch, units)).astype("float32") for _ in range(2)]
    training = options.get("training", False)
    weights = randomize_weights(stock, features, rng)
    results = []
    for layer in (stock, fused):
        layer.build((batch, steps, features))
        layer.set_weights(weights)
        drawn = record_dropout_masks(layer)
        results.append(run_with_grads(layer, x, mask, states, training, seed=3))
    (stock_out, stock_grads), (fused_out, fused_grads) = results
    ref_out, ref_grads = reference_run(fused, drawn, weights, x, mask, states, kwargs, training, seed=3)
    assert len(fused_out) == len(stock_out) == len(ref_out)
    for k, (f, s, r) in enumerate(zip(fused_out, stock_out, ref_out)):
        assert_close_to_stock_and_reference(f"output {k}", f, s, r, atol=1e-5)
    for name, s in stock_grads.items():
        assert_close_to_stock_and_reference(
            f"grad {name}", fused_grads[name], s, ref_grads[name], atol=1e-4)
