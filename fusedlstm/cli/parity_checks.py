"""The parity checks of `python -m fusedlstm check`: fused against stock, on this machine."""

import dataclasses

import keras
import numpy as np

import fusedlstm
from fusedlstm.testing.parity import outputs_and_grads

PARITY_SHAPE = (4, 12, 8, 16)
SEED = 1
OUTPUT_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4


@dataclasses.dataclass
class ParityCheck:
    """One comparison of the fused layer against the stock layer.

    Attributes:
        name: what was compared.
        passed: whether it is within tolerance (or byte-identical).
        max_abs_diff: the largest absolute difference, `None` for the
            byte-identity check.
        tolerance: the largest difference allowed, `None` for the
            byte-identity check.
    """

    name: str
    passed: bool
    max_abs_diff: float | None = None
    tolerance: float | None = None


def check_parity():
    """Compares `fusedlstm.LSTM` with `keras.layers.LSTM` on this machine.

    Both layers are built after the same `keras.utils.set_random_seed` and
    must hold byte-identical weights. Then, with the stock weights copied
    into the fused layer, outputs (sequence, h and c) and gradients (inputs
    and weights) of a fixed random projection of the outputs must agree,
    without a mask and with one that has right padding, left padding and a
    hole.

    Returns:
        A list of `ParityCheck`.
    """
    N, T, C, H = PARITY_SHAPE
    layers = []
    for layer_class in (keras.layers.LSTM, fusedlstm.LSTM):
        keras.utils.set_random_seed(SEED)
        layer = layer_class(H, return_sequences=True, return_state=True)
        layer.build((N, T, C))
        layers.append(layer)
    stock, fused = layers
    checks = [ParityCheck(
        f"get_weights() byte-identical after keras.utils.set_random_seed({SEED})",
        _same_bytes(stock.get_weights(), fused.get_weights()))]
    fused.set_weights(stock.get_weights())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, T, C)).astype("float32")
    mask = np.ones((N, T), bool)
    mask[1, T // 2:] = False
    mask[2, :3] = False
    mask[3, T // 3] = False
    for label, case_mask in (("", None), (", masked", mask)):
        stock_out, stock_grads = outputs_and_grads(stock, x, case_mask)
        fused_out, fused_grads = outputs_and_grads(fused, x, case_mask)
        checks.append(_within("outputs" + label, stock_out, fused_out, OUTPUT_TOLERANCE))
        checks.append(_within("gradients" + label, list(stock_grads.values()),
                              list(fused_grads.values()), GRADIENT_TOLERANCE))
    return checks


def _same_bytes(arrays, others):
    return len(arrays) == len(others) and all(
        a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        for a, b in zip(arrays, others))


def _within(name, expected, actual, tolerance):
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(expected, actual))
    return ParityCheck(name, diff <= tolerance, diff, tolerance)


def format_parity(checks):
    N, T, C, H = PARITY_SHAPE
    lines = [f"Parity with keras.layers.LSTM (N={N}, T={T}, C={C}, H={H})"]
    for check in checks:
        status = "PASS" if check.passed else "FAIL"
        line = f"  {status}  {check.name}"
        if check.tolerance is not None:
            line = f"{line:<30} max |diff| {check.max_abs_diff:.1e} (tolerance {check.tolerance:.0e})"
        lines.append(line)
    return "\n".join(lines)
