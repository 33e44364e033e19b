"""Outputs, states and every gradient of fusedlstm.LSTM against keras.layers.LSTM
holding the same weights and against a float64 NumPy reference."""

import pytest

import parity


@pytest.mark.parametrize("size", parity.SIZES, ids=lambda s: "N%d-T%d-C%d-H%d" % s)
@pytest.mark.parametrize("flag", sorted(parity.FLAGS))
def test_matches_stock_layer_and_float64_reference(flag, size):
    case = parity.make_case(flag, size)
    fused, stock, ref, _ = parity.run_case(case)
    parity.assert_matches(fused, stock, ref, size)
