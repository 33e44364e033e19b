"""The parity comparison has teeth: float32 results with a real bug in them fail
it at every parity size, while correct float32 results, summed in any order,
pass it.

Each buggy result is the float64 reference run with the bug injected, cast to
float32: the most accurate a kernel with that bug could be.
"""

import numpy as np
import pytest

import parity
from fusedlstm.testing import projected
from fusedlstm.kernels.gates import ACTIVATION_CODES

SIZE_IDS = {"ids": lambda s: "N%d-T%d-C%d-H%d" % s}


def as_float32(results):
    return parity.Results([np.float32(o) for o in results.outputs],
                          {k: np.float32(g) for k, g in results.grads.items()})


def swap_forget_and_cell_blocks(array):
    """Exchanges the f and c column blocks of a [..., 4H] array (gate order i, f, c, o)."""
    i, f, c, o = np.split(array, 4, axis=-1)
    return np.concatenate([i, c, f, o], axis=-1)


def wrong_gate_block(case, drawn):
    """A kernel that reads the forget gate's columns as the cell input's and back."""
    weights = [swap_forget_and_cell_blocks(w) for w in case.weights]
    results = parity.run_reference(case, drawn, weights=weights)
    for name in ("kernel", "recurrent_kernel", "bias"):
        results.grads[name] = swap_forget_and_cell_blocks(results.grads[name])
    return results


def mask_one_step_late(case, drawn):
    """A kernel that applies step t - 1's mask at step t (every row live at step 0)."""
    late = np.ones_like(case.mask)
    late[:, 1:] = case.mask[:, :-1]
    return parity.run_reference(case, drawn, mask=late)


def dropped_bias(case, drawn):
    """A kernel that never adds the bias."""
    kernel, recurrent_kernel, bias = case.weights
    return parity.run_reference(case, drawn, weights=[kernel, recurrent_kernel, 0 * bias])


BUGS = {
    "wrong_gate_block": (wrong_gate_block, "return_sequences"),
    "mask_one_step_late": (mask_one_step_late, "mask_holes"),
    "dropped_bias": (dropped_bias, "return_sequences"),
}


@pytest.mark.parametrize("size", parity.SIZES, **SIZE_IDS)
@pytest.mark.parametrize("bug", sorted(BUGS))
def test_comparison_fails_on_bug_and_passes_without(bug, size):
    """The reference cast to float32 and the fused layer pass; the buggy result fails."""
    inject, flag = BUGS[bug]
    case = parity.make_case(flag, size)
    fused, stock, ref, drawn = parity.run_case(case)
    parity.assert_matches(as_float32(ref), stock, ref, size)
    parity.assert_matches(fused, stock, ref, size)
    with pytest.raises(AssertionError, match="fused vs float64"):
        parity.assert_matches(as_float32(inject(case, drawn)), stock, ref, size)


def row_by_row_float32_sum(terms):
    """The sum over axis 0 added one term after another in float32: the least
    accurate order a GEMM may take."""
    return np.cumsum(terms, axis=0, dtype=np.float32)[-1]


def kernel_weight_gradients(case):
    """`(d_xw, inputs)` for an unmasked case: d_xw [N * T, 4H] from the CPU kernels,
    and the [N * T, K] inputs of the kernel and recurrent kernel gradients."""
    kernel, recurrent_kernel, bias = case.weights
    N, T, C = case.x.shape
    H = recurrent_kernel.shape[0]
    zeros = np.zeros((N, H), np.float32)
    codes = ACTIVATION_CODES["tanh"], ACTIVATION_CODES["sigmoid"]
    _, _, _, saved = projected.forward(case.x @ kernel + bias, recurrent_kernel, zeros, zeros,
                                       None, None, *codes, False, True)
    probe = np.random.default_rng(parity.PROBE_SEED).standard_normal((N, T, H))
    d_xw, _, _ = projected.backward(recurrent_kernel, None, None, *codes, False, saved,
                                    np.float32(probe), zeros, zeros)
    rows = N * T
    inputs = {"kernel": case.x.reshape(rows, C), "recurrent_kernel": saved[0].reshape(rows, H)}
    return d_xw.reshape(rows, 4 * H), inputs


@pytest.mark.parametrize("size", parity.SIZES, **SIZE_IDS)
@pytest.mark.parametrize("order", ["sgemm", "row_by_row"])
def test_float32_weight_gradient_sums_pass(order, size):
    """Weight gradients summed over the T * N rows in float32, by an sgemm or row by
    row, from the kernels' own d_xw, stay within the bounds."""
    case = parity.make_case("return_sequences", size)
    fused, stock, ref, _ = parity.run_case(case)
    d_xw, inputs = kernel_weight_gradients(case)
    if order == "sgemm":
        grads = {name: a.T @ d_xw for name, a in inputs.items()}
        grads["bias"] = np.ones(len(d_xw), np.float32) @ d_xw
    else:
        grads = {name: row_by_row_float32_sum(a[:, :, None] * d_xw[:, None, :])
                 for name, a in inputs.items()}
        grads["bias"] = row_by_row_float32_sum(d_xw)
    summed = parity.Results(fused.outputs, {**fused.grads, **grads})
    parity.assert_matches(summed, stock, ref, size)


@pytest.mark.parametrize("name", ["output 0", "grad x", "grad initial_state_0", "grad kernel",
                                  "grad recurrent_kernel", "grad bias"])
def test_allowance_grows_with_the_depth_of_the_sums(name):
    """Every value's bound grows with T: each step sums on top of the last, forward
    and backward, so a longer sequence rounds more (a bound fixed in T is either
    loose at T = 1 or wrong at T = 64)."""
    short, long = (parity.float32_rounding_allowance(np.ones(1), parity.summed_terms(
        name, (5, steps, 4, 31))) for steps in (1, 64))
    assert long > 4 * short
