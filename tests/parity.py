"""One parity case: the stock layer, the fused layer and the float64 reference
on the same weights, inputs and dropout masks, and the comparison they must pass.

`test_parity.py` runs every case; `test_tolerance_catches_bugs.py` proves
that the same comparison fails on float32 results with a real bug in them.
"""

import dataclasses
import zlib

import numpy as np

from fusedlstm.testing import reference
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

EPS32 = float(np.finfo(np.float32).eps)
PROBE_SEED = 3


@dataclasses.dataclass
class Results:
    """What one layer (or the reference) returned, and the gradients of the probe loss."""

    outputs: list
    grads: dict


@dataclasses.dataclass
class Case:
    """One flag at one size: both layers built and fed the same weights and inputs."""

    size: tuple
    kwargs: dict
    x: np.ndarray
    mask: np.ndarray | None
    states: list | None
    training: bool
    weights: list
    stock: object
    fused: object


def make_case(flag, size):
    """Builds both layers for `flag` at `size` with random weights and inputs.

    Everything random is drawn from a seed derived from `flag` and `size`, so a
    case is the same in every process and on every machine.
    """
    kwargs, options = FLAGS[flag]
    batch, steps, features, units = size
    rng = np.random.default_rng(zlib.crc32(f"{flag}{size}".encode()))
    stock, fused = make_pair(units=units, random_seed=7, **kwargs)
    x = rng.normal(size=(batch, steps, features)).astype("float32")
    mask = make_mask(options["mask"], batch, steps, rng) if "mask" in options else None
    states = None
    if options.get("initial_state"):
        states = [rng.normal(size=(batch, units)).astype("float32") for _ in range(2)]
    weights = randomize_weights(stock, features, rng)
    for layer in (stock, fused):
        layer.build((batch, steps, features))
        layer.set_weights(weights)
    return Case(size, kwargs, x, mask, states, options.get("training", False), weights,
                stock, fused)


def run_case(case):
    """`(fused, stock, ref, drawn)`: both layers' `Results`, the float64 reference's,
    and the dropout masks the fused layer drew."""
    stock, _ = run_layer(case, case.stock)
    fused, drawn = run_layer(case, case.fused)
    return fused, stock, run_reference(case, drawn), drawn


def run_layer(case, layer):
    """`(Results, drawn)`: the layer's outputs and gradients, and the dropout masks it drew."""
    drawn = record_dropout_masks(layer)
    outputs, grads = run_with_grads(layer, case.x, case.mask, case.states, case.training,
                                    seed=PROBE_SEED)
    return Results(outputs, grads), drawn


def run_reference(case, drawn, weights=None, mask=None):
    """The float64 reference for `case`, given the dropout masks the layer drew.

    `weights` and `mask` replace the case's own (the bug proofs inject bugs
    through them).
    """
    outputs, grads = reference_run(
        case.fused, drawn, case.weights if weights is None else weights, case.x,
        case.mask if mask is None else mask, case.states, case.kwargs, case.training,
        seed=PROBE_SEED)
    return Results(outputs, grads)


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


def summed_terms(name, size):
    """How many float32 roundings the deepest chain of sums behind the value `name`
    adds up: its depth, which grows with T because each step sums on top of the last.

    Outputs and states: each of the T steps sums C + H products into the
    pre-activations, and the carry adds one term per step: T * (C + H + 1) for
    the last step (the forget gate damps what earlier steps' rounding leaves,
    which this bound does not count on). The gradients of the inputs and initial
    states: the backward recurrence sums 4H products per step over the T steps,
    T * 4H. Weight and bias gradients: one product per step and batch row
    (T * N terms), each factor carrying the T * 4H of its d_xw.
    """
    batch, steps, features, units = size
    backward_chain = steps * 4 * units
    if name in ("grad kernel", "grad recurrent_kernel", "grad bias"):
        return steps * batch + backward_chain
    if name.startswith("grad "):
        return backward_chain
    return steps * (features + units + 1)


def float32_rounding_allowance(ref, terms):
    """What float32 rounding may move a value by: eps32 * (8 + 2 * sqrt(terms)) *
    max(1, max|ref|).

    The rounding error of a float32 sum of n terms, added in any order, grows
    like sqrt(n) relative to the sum when the rounding errors are independent
    (Higham and Mary, "A new approach to probabilistic rounding error
    analysis", SISC 2019). On the weight gradients at the parity sizes, a plain
    float32 sum row after row (the least accurate order a GEMM takes) erred by
    0.2 to 0.31 * sqrt(n) * eps32 * max|ref|, an sgemm by less: so the length
    term is needed (a fixed multiple of eps32 fails at T * N = 2048 rows, as a
    bias gradient did on an Intel Xeon), and 2 * sqrt(n) allows any order with
    margin. The 8 covers what is not a long sum: the fast tanh (2.2 eps32) and
    the few roundings of each value. Magnitudes below 1 count as 1: the
    activations, probes and weights are O(1), so a smaller value is small by
    cancellation, not because its terms are, and its rounding is that of its
    terms (this is the old 1e-6 floor). A real bug (a wrong gate, a mask one
    step off, a lost bias) moves results by percents, far beyond the largest
    allowance at the parity sizes, eps32 * (8 + 2 * sqrt(64 * 5 + 64 * 512))
    = 4.4e-5 of their magnitude.
    """
    return EPS32 * (8 + 2 * np.sqrt(terms)) * max(1.0, np.abs(ref).max(initial=0))


def assert_close_to_stock_and_reference(name, fused, stock, ref, terms):
    """Asserts that a fused value agrees with the float64 reference and the stock layer.

    Against the reference: no worse than twice the stock layer's own error,
    plus float32 rounding (`float32_rounding_allowance`), so that neither a
    BLAS's summation order nor how accurate the stock layer happens to be on
    this CPU decides the outcome. Against the stock layer: within twice that
    rounding (each of them may err by it, in opposite directions), which does
    not trust the reference: it catches a misreading of Keras's semantics that
    the reference might share.

    Raises:
        AssertionError: naming the value and both sides of the failed bound.
    """
    fused, stock, ref = (np.asarray(a, np.float64) for a in (fused, stock, ref))
    assert fused.shape == stock.shape == ref.shape, (
        f"{name}: shapes fused {fused.shape}, stock {stock.shape}, float64 {ref.shape}")
    rounding = float32_rounding_allowance(ref, terms)
    fused_vs_ref = np.abs(fused - ref).max(initial=0)
    stock_vs_ref = np.abs(stock - ref).max(initial=0)
    fused_vs_stock = np.abs(fused - stock).max(initial=0)
    assert fused_vs_ref <= 2 * stock_vs_ref + rounding, (
        f"{name}: fused vs float64 {fused_vs_ref:.3g} > 2 x stock's {stock_vs_ref:.3g} "
        f"+ float32 rounding {rounding:.3g}")
    assert fused_vs_stock <= 2 * rounding, (
        f"{name}: fused vs stock {fused_vs_stock:.3g} > 2 x float32 rounding {rounding:.3g}")


def assert_matches(fused, stock, ref, size):
    """Every output and gradient of `fused` passes `assert_close_to_stock_and_reference`."""
    assert len(fused.outputs) == len(stock.outputs) == len(ref.outputs)
    for k, (f, s, r) in enumerate(zip(fused.outputs, stock.outputs, ref.outputs)):
        name = f"output {k}"
        assert_close_to_stock_and_reference(name, f, s, r, summed_terms(name, size))
    for key, s in stock.grads.items():
        name = f"grad {key}"
        assert_close_to_stock_and_reference(
            name, fused.grads[key], s, ref.grads[key], summed_terms(name, size))
