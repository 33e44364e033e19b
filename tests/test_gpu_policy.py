"""`use_fused="auto"` on a GPU (`fusedlstm.backends.gpu_policy`) and the kernel choice
(`kernels.select`), decided with fake GPU conditions."""

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

from fusedlstm import LSTM
from fusedlstm.backends import gpu_policy
from fusedlstm.kernels import cpu
from fusedlstm.kernels.select import select_kernels

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MODEL_TABLE = RESULTS / "gpu-model-h100.json"
GPU_RUN_RESULT = RESULTS / "gpu-h200.json"
# A GPU call past rule 0: the user opted in with FUSEDLSTM_KERNEL=cuda.
GPU_CALL = gpu_policy.Call(
    backend="tensorflow", on_gpu=True, activation="tanh", recurrent_activation="sigmoid",
    use_bias=True, recurrent_dropout=0.0, training=False, has_mask=False, batch=256, units=512,
    kernel_choice="cuda")


def call(**changes):
    return dataclasses.replace(GPU_CALL, **changes)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the once-only warnings anew, and the kernels as importable."""
    monkeypatch.setattr(gpu_policy, "_WARNED", set())
    monkeypatch.setattr("fusedlstm.kernels.select._WARNED", set())
    monkeypatch.delenv("FUSEDLSTM_KERNEL", raising=False)


@pytest.fixture
def cuda_missing(monkeypatch):
    """The CUDA kernels fail to import, as without numba-cuda or cuda-core."""
    monkeypatch.setitem(sys.modules, "fusedlstm.kernels.cuda", None)


def test_cudnn_where_the_model_predicts_no_win():
    assert not gpu_policy.fused_on_auto(GPU_CALL)


@pytest.mark.parametrize("changes", [
    dict(on_gpu=False),
    dict(has_mask=True),
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


# ---------------------------------------------------------------------------
# Rule 0: unverified or missing CUDA kernels.


def test_verified_matches_the_committed_gpu_run_result():
    verified = GPU_RUN_RESULT.exists() and json.loads(GPU_RUN_RESULT.read_text()).get(
        "verified") is True
    assert gpu_policy.CUDA_KERNELS_VERIFIED is verified


@pytest.mark.parametrize("changes", [dict(), dict(has_mask=True), dict(batch=1),
                                     dict(recurrent_dropout=0.25, training=True)])
def test_unverified_auto_on_a_gpu_runs_stock_and_warns_once_how_to_opt_in(monkeypatch, changes):
    monkeypatch.setattr(gpu_policy, "CUDA_KERNELS_VERIFIED", False)
    unset = call(kernel_choice="auto", **changes)
    with pytest.warns(UserWarning, match=r"use_fused=True.*FUSEDLSTM_KERNEL=cuda"):
        assert not gpu_policy.fused_on_auto(unset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not gpu_policy.fused_on_auto(unset)


def test_verified_auto_on_a_gpu_follows_the_rule(monkeypatch):
    monkeypatch.setattr(gpu_policy, "CUDA_KERNELS_VERIFIED", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gpu_policy.fused_on_auto(call(kernel_choice="auto", has_mask=True))
        assert not gpu_policy.fused_on_auto(call(kernel_choice="auto"))


def test_auto_on_a_gpu_without_numba_cuda_runs_stock_with_one_warning(monkeypatch,
                                                                       cuda_missing):
    monkeypatch.setattr(gpu_policy, "CUDA_KERNELS_VERIFIED", True)
    masked = call(kernel_choice="auto", has_mask=True)
    with pytest.warns(UserWarning, match="cannot be imported"):
        assert not gpu_policy.fused_on_auto(masked)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not gpu_policy.fused_on_auto(masked)


def test_layer_on_a_gpu_runs_stock_until_verified(monkeypatch, fused_calls):
    monkeypatch.setattr(gpu_policy, "CUDA_KERNELS_VERIFIED", False)
    monkeypatch.setattr(gpu_policy, "_on_gpu", lambda tensor, backend: True)
    layer = LSTM(3)
    x = np.ones((2, 4, 5), "float32")
    with pytest.warns(UserWarning, match="not yet verified"):
        layer(x, mask=np.array([[1, 1, 0, 0], [0, 1, 1, 1]], bool))
    assert fused_calls == []
    monkeypatch.setenv("FUSEDLSTM_KERNEL", "cpu")  # opted out of the CUDA kernels: rule 1
    layer(x, mask=np.array([[1, 1, 0, 0], [0, 1, 1, 1]], bool))
    assert fused_calls


def test_the_rule_reads_no_tensor_values(monkeypatch):
    layer = LSTM(4)
    x = keras.ops.ones((2, 3, 5))
    layer.build(x.shape)
    mask = keras.ops.convert_to_tensor(np.array([[1, 1, 0], [1, 0, 0]], bool))

    def no_host_copies(*args, **kwargs):
        raise AssertionError("the GPU rule copied a tensor to the host")

    monkeypatch.setattr(keras.ops, "convert_to_numpy", no_host_copies)
    monkeypatch.setattr(np, "asarray", no_host_copies)
    found = gpu_policy.call_of(layer, x, mask, False)
    assert found.has_mask and not hasattr(found, "mask_right_padded")
    assert gpu_policy.fused_on_auto(dataclasses.replace(found, on_gpu=True, kernel_choice="cuda"))


def test_call_of_a_layer_on_the_cpu_runs_fused():
    layer = LSTM(4, recurrent_dropout=0.1)
    x = keras.ops.ones((2, 3, 5))
    layer.build(x.shape)
    found = gpu_policy.call_of(layer, x, None, True)
    assert (found.on_gpu, found.units, found.batch, found.recurrent_dropout) == (False, 4, 2, 0.1)
    assert found.kernel_choice == "auto"
    assert gpu_policy.fused_on_auto(found)


# ---------------------------------------------------------------------------
# kernels.select without numba-cuda.


def test_auto_without_numba_cuda_falls_back_to_the_cpu_kernels_with_one_warning(cuda_missing):
    with pytest.warns(UserWarning, match="CPU kernels run instead"):
        assert select_kernels(data_on_gpu=True) is cpu
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_kernels(data_on_gpu=True) is cpu
        assert select_kernels(data_on_gpu=False) is cpu


def test_explicit_cuda_without_numba_cuda_fails_loudly(monkeypatch, cuda_missing):
    monkeypatch.setenv("FUSEDLSTM_KERNEL", "cuda")
    with pytest.raises(ImportError, match=r"FUSEDLSTM_KERNEL=cuda asks for the CUDA kernels.*"
                                          r"numba-cuda"):
        select_kernels(data_on_gpu=False)
