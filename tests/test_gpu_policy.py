"""`use_fused="auto"` on a GPU (`fusedlstm.gpu_policy`), decided with fake GPU conditions."""

import dataclasses
import json
from pathlib import Path

import keras
import numpy as np
import pytest

from fusedlstm import LSTM
from fusedlstm.backends import gpu_policy

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MODEL_TABLE = RESULTS / "gpu-model-h100.json"
GPU_CALL = gpu_policy.Call(
    backend="tensorflow", on_gpu=True, activation="tanh", recurrent_activation="sigmoid",
    use_bias=True, recurrent_dropout=0.0, training=False, has_mask=False,
    mask_right_padded=True, batch=256, units=512)


def call(**changes):
    return dataclasses.replace(GPU_CALL, **changes)


def test_cudnn_where_the_model_predicts_no_win():
    assert not gpu_policy.fused_on_auto(GPU_CALL)


@pytest.mark.parametrize("changes", [
    dict(on_gpu=False),
    dict(has_mask=True, mask_right_padded=False),
    dict(backend="torch", has_mask=True),
    dict(recurrent_dropout=0.25, training=True),
    dict(activation="relu"),
    dict(recurrent_activation="hard_sigmoid"),
    dict(use_bias=False),
    dict(batch=16),
    dict(batch=1, units=1024),
    dict(batch=8, units=100),
])
def test_fused_where_cudnn_is_left_or_the_model_predicts_a_win(changes):
    assert gpu_policy.fused_on_auto(call(**changes))


@pytest.mark.parametrize("changes", [
    dict(has_mask=True, mask_right_padded=True),
    dict(recurrent_dropout=0.25, training=False),
    dict(batch=17, units=256),
    dict(batch=2, units=1024),
    dict(batch=1, units=2048),
])
def test_cudnn_where_it_stays_available_and_no_win_is_predicted(changes):
    assert not gpu_policy.fused_on_auto(call(**changes))


def test_wins_match_the_committed_model_table():
    rows = json.loads(MODEL_TABLE.read_text())["rows"]
    wins = {}
    for row in rows:
        if row["forward_ratio_fp32"] < 1.0:
            wins[row["H"]] = max(wins.get(row["H"], 0), row["N"])
    assert gpu_policy.FUSED_MAX_BATCH == wins


@pytest.mark.parametrize("mask, expected", [
    (None, True),
    (np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]], bool), True),
    (np.array([[0, 1, 1], [1, 1, 1]], bool), False),
    (np.array([[1, 0, 1]], bool), False),
    ([np.array([[1, 1, 0]], bool)], True),
    (np.ones(3, bool), False),
])
def test_right_padded_masks(mask, expected):
    assert gpu_policy._right_padded(mask) is expected


def test_call_of_a_layer_on_the_cpu_runs_fused():
    layer = LSTM(4, recurrent_dropout=0.1)
    x = keras.ops.ones((2, 3, 5))
    layer.build(x.shape)
    found = gpu_policy.call_of(layer, x, None, True)
    assert (found.on_gpu, found.units, found.batch, found.recurrent_dropout) == (False, 4, 2, 0.1)
    assert gpu_policy.fused_on_auto(found)
