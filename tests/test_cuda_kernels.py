"""Tests of the CUDA kernels (`kernels/cuda/`), most of them without a GPU.

1. Simulator. The kernels run in Numba's CUDA simulator, which must be chosen
   (`NUMBA_ENABLE_CUDASIM=1`) before `numba.cuda` is first imported, while the
   rest of the suite needs the real CUDA target. So `simulated` runs this file
   as a script in a subprocess under the simulator; the script runs every case
   and prints one JSON line of measured errors, and the tests assert them
   against `kernels.cpu` and the float64 reference. Cases use tiny blocks so
   that small inputs span several thread groups. The simulator runs blocks
   one after another and its grid barrier is a block barrier, so cooperative
   launches run one block; multi-block cases use `step_launches=True` (one
   launch per step, the same device functions), with small weight caches so
   that part of the weights streams and H > 128 so that rows stage in chunks.
2. GPU. Multi-block cooperative launches against the CPU kernels, skipped
   without a device.

The SASS of every kernel is checked offline by `test_cuda_sass.py`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from numba import config, cuda  # noqa: E402

BACKEND_INDEPENDENT = True  # see conftest.py

from fusedlstm.testing import reference  # noqa: E402
from fusedlstm.kernels import cpu  # noqa: E402
import xw_kernels  # noqa: E402  (the CPU drivers with the CUDA drivers' signatures)
from fusedlstm.kernels.gates import ACTIVATION_CODES  # noqa: E402

SIMULATED = bool(config.ENABLE_CUDASIM)
GPU = not SIMULATED and cuda.is_available()
requires_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
STATE_TOL = 1e-5
GRAD_TOL = 1e-4
SIMULATOR_TIMEOUT_S = 600

# Simulator cases: sizes, masking, dropout, activations and launch options.
# Mask kinds: "ragged" has a full row, left padding, holes and a fully masked
# row. `launch` goes to the drivers as keyword arguments.
CASES = {
    "plain": dict(T=4, N=3, H=5, launch=dict(single_block=True, block_size=8, lanes=4)),
    "mask_last_output": dict(
        T=5, N=4, H=5, mask="ragged", zero_output=False,
        launch=dict(single_block=False, block_size=16, lanes=8, cache_floats=40)),
    "mask_zero_output": dict(
        T=5, N=4, H=5, mask="ragged", zero_output=True,
        launch=dict(single_block=True, block_size=8, lanes=2)),
    "recurrent_dropout_streamed": dict(
        T=4, N=3, H=5, mask="ragged", dropout=True,
        launch=dict(single_block=False, block_size=8, lanes=8, cache_floats=0)),
    "activations_relu_hard_sigmoid": dict(
        T=3, N=2, H=3, activation="relu", recurrent_activation="hard_sigmoid",
        launch=dict(single_block=True, block_size=4, lanes=1)),
    "H1_T7": dict(T=7, N=2, H=1, launch=dict(single_block=False, block_size=32, lanes=32)),
    "H31_two_row_tiles": dict(
        T=3, N=5, H=31, dropout=True,
        launch=dict(single_block=False, block_size=64, lanes=32, cache_floats=1000)),
    "T1_N1_auto_launch": dict(T=1, N=1, H=3, launch=dict(block_size=8, lanes=4)),
    "multiblock_streamed_dropout": dict(
        T=4, N=9, H=37, mask="ragged", dropout=True,
        launch=dict(step_launches=True, units_per_block=8, cache_floats=640, block_size=32,
                    lanes=8)),
    "multiblock_cached_zero_output": dict(
        T=3, N=5, H=24, mask="ragged", zero_output=True,
        launch=dict(step_launches=True, units_per_block=5, block_size=16, lanes=4)),
    "multiblock_chunked_rows": dict(
        T=2, N=2, H=130, launch=dict(step_launches=True, units_per_block=65, block_size=64,
                                     lanes=16, cache_floats=4000)),
}


# ---------------------------------------------------------------------------
# Simulator script side: runs in the subprocess.


def _case_inputs(T, N, H, mask=None, dropout=False, seed=0, **_):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    inputs = dict(
        xw=rng.standard_normal((N, T, 4 * H)).astype(f32),
        recurrent_kernel=(rng.standard_normal((H, 4 * H)) / np.sqrt(H)).astype(f32),
        h0=rng.standard_normal((N, H)).astype(f32),
        c0=rng.standard_normal((N, H)).astype(f32),
        mask=None, recurrent_mask=None,
        d_outputs=rng.standard_normal((N, T, H)).astype(f32),
        d_h_n=rng.standard_normal((N, H)).astype(f32),
        d_c_n=rng.standard_normal((N, H)).astype(f32))
    if mask == "ragged":
        m = np.ones((N, T), bool)
        patterns = (np.arange(T) >= 2, np.arange(T) % 2 == 0, np.zeros(T, bool))
        for n, pattern in zip(range(1, N), patterns):  # left padding, holes, fully masked
            m[n] = pattern
        inputs["mask"] = m
    if dropout:
        keep = rng.random((4, N, H)) > 0.3
        inputs["recurrent_mask"] = (keep / 0.7).astype(f32)
    return inputs


def _max_errors(got, want):
    return [float(np.max(np.abs(np.asarray(g, np.float64) - w), initial=0.0))
            for g, w in zip(got, want)]


def _run_case(kernels, case):
    """Errors of `kernels.cuda` against `kernels.cpu` and the float64 reference."""
    act_name = case.get("activation", "tanh")
    ract_name = case.get("recurrent_activation", "sigmoid")
    act, ract = ACTIVATION_CODES[act_name], ACTIVATION_CODES[ract_name]
    zero_output = case.get("zero_output", False)
    x = _case_inputs(**case)
    common = (x["mask"], x["recurrent_mask"], act, ract, zero_output)
    fwd_args = (x["xw"], x["recurrent_kernel"], x["h0"], x["c0"]) + common
    launch = case["launch"]

    outputs, h_n, c_n, saved = kernels.forward(*fwd_args, True, **launch)
    want = xw_kernels.forward(*fwd_args, True)
    inference = kernels.forward(*fwd_args, False, **launch)
    grads = kernels.backward(x["recurrent_kernel"], *common, saved, x["d_outputs"], x["d_h_n"],
                             x["d_c_n"], **launch)
    want_grads = xw_kernels.backward(x["recurrent_kernel"], *common, want[3], x["d_outputs"],
                                     x["d_h_n"], x["d_c_n"])

    # The reference takes batch-major inputs and a projection: an identity
    # kernel makes its input projection `xw` itself.
    H = case["H"]
    ref_out, ref_h, ref_c, tape = reference.lstm_forward(
        x["xw"], np.eye(4 * H), x["recurrent_kernel"], None,
        h0=x["h0"], c0=x["c0"], mask=x["mask"],
        recurrent_masks=x["recurrent_mask"], activation=act_name,
        recurrent_activation=ract_name, zero_output_for_mask=zero_output)
    ref_grads = reference.lstm_backward(
        tape, x["d_outputs"], x["d_h_n"], x["d_c_n"], activation=act_name,
        recurrent_activation=ract_name, zero_output_for_mask=zero_output)

    return {
        "cpu_states": _max_errors((outputs, h_n, c_n) + tuple(saved), want[:3] + want[3]),
        "cpu_grads": _max_errors(grads, want_grads),
        "ref_states": _max_errors((outputs, h_n, c_n), (ref_out, ref_h, ref_c)),
        "ref_grads": _max_errors(
            (grads[0], grads[1], grads[2]),
            (ref_grads["x"], ref_grads["h0"], ref_grads["c0"])),
        "inference_vs_training": _max_errors(inference[:3], (outputs, h_n, c_n)),
        "inference_saved_is_none": inference[3] is None,
        "all_numpy": all(isinstance(a, np.ndarray)
                         for a in (outputs, h_n, c_n) + tuple(saved) + tuple(grads)),
    }


def _validation_messages(kernels):
    """The ValueError message (or None) of each invalid call."""
    x = _case_inputs(T=2, N=3, H=5)
    args = [x["xw"], x["recurrent_kernel"], x["h0"], x["c0"], None, None, 0, 1, False, False]

    def message(replace=None, **launch):
        call_args = list(args)
        for index, value in (replace or {}).items():
            call_args[index] = value
        try:
            kernels.forward(*call_args, **launch)
        except ValueError as error:
            return str(error)
        return None

    def backward_message(saved):
        try:
            kernels.backward(x["recurrent_kernel"], None, None, 0, 1, False, saved,
                             x["d_outputs"], x["d_h_n"], x["d_c_n"])
        except ValueError as error:
            return str(error)
        return None

    return {
        "xw_rank": message({0: x["xw"][0]}),
        "xw_not_4h": message({0: x["xw"][..., :7]}),
        "recurrent_kernel_shape": message({1: x["recurrent_kernel"][:, :8]}),
        "h0_shape": message({2: x["h0"][:2]}),
        "mask_shape": message({4: np.ones((3, 3), bool)}),
        "recurrent_mask_shape": message({5: np.ones((4, 3, 4), np.float32)}),
        "device_dtype": message({0: cuda.to_device(x["xw"].astype(np.float64))}),
        "device_layout": message({1: cuda.to_device(np.asfortranarray(x["recurrent_kernel"]))}),
        "lanes": message(lanes=3),
        "block_size": message(block_size=12, lanes=8),
        "cache_floats": message(cache_floats=10 ** 6),
        "units_per_block": message(units_per_block=0),
        "too_many_blocks": message(single_block=False, block_size=8, lanes=4,
                                   units_per_block=2),
        "single_block_units": message(single_block=True, block_size=8, lanes=4,
                                      units_per_block=2),
        "backward_without_saved": backward_message(None),
    }


def _device_array_run(kernels):
    """Device-array inputs give device arrays equal to the NumPy path."""
    x = _case_inputs(T=3, N=2, H=4, seed=3)
    launch = dict(single_block=True, block_size=8, lanes=4)
    args = (x["xw"], x["recurrent_kernel"], x["h0"], x["c0"], None, None, 0, 1, False, True)
    host = kernels.forward(*args, **launch)
    stream = cuda.stream()
    device = kernels.forward(*(cuda.to_device(a) for a in args[:4]), *args[4:],
                             stream=stream, **launch)
    stream.synchronize()
    back = kernels.backward(cuda.to_device(x["recurrent_kernel"]), None, None, 0, 1, False,
                            device[3], cuda.to_device(x["d_outputs"]),
                            cuda.to_device(x["d_h_n"]), cuda.to_device(x["d_c_n"]), **launch)
    host_back = kernels.backward(x["recurrent_kernel"], None, None, 0, 1, False, host[3],
                                 x["d_outputs"], x["d_h_n"], x["d_c_n"], **launch)
    returned = device[:3] + tuple(device[3]) + tuple(back)
    return {
        "returns_device_arrays": all(cuda.devicearray.is_cuda_ndarray(a) for a in returned),
        "max_error": max(_max_errors([a.copy_to_host() for a in returned],
                                     host[:3] + tuple(host[3]) + tuple(host_back))),
    }


def _empty_runs(kernels):
    """N=0 or T=0 launches nothing and gives the CPU drivers' results, on host or device."""
    results = {}
    for N, T in ((0, 4), (2, 0)):
        x = _case_inputs(T=max(T, 1), N=max(N, 1), H=3)
        xw = np.zeros((N, T, 12), np.float32)
        h0, c0 = x["h0"][:N], x["c0"][:N]
        for place in ("host", "device"):
            put = cuda.to_device if place == "device" else np.asarray
            got = kernels.forward(put(xw), put(x["recurrent_kernel"]), put(h0), put(c0), None,
                                  None, 0, 1, False, True)
            grads = kernels.backward(put(x["recurrent_kernel"]), None, None, 0, 1, False, got[3],
                                     put(np.zeros((N, T, 3), np.float32)), put(h0), put(c0))
            host = [np.asarray(a) if place == "host" else a.copy_to_host()
                    for a in got[:3] + tuple(got[3]) + tuple(grads)]
            want = xw_kernels.forward(xw, x["recurrent_kernel"], h0, c0, None, None, 0, 1,
                                      False, True)
            want_grads = xw_kernels.backward(x["recurrent_kernel"], None, None, 0, 1, False,
                                             want[3], np.zeros((N, T, 3), np.float32), h0, c0)
            expected = list(want[:3] + tuple(want[3]) + tuple(want_grads))
            results[f"N{N}_T{T}_{place}"] = (
                [a.shape for a in host] == [a.shape for a in expected]
                and all(np.array_equal(a, b) for a, b in zip(host, expected) if a.size))
    return results


def _selected_under_cuda_switch():
    from fusedlstm.kernels import cuda as cuda_kernels
    from fusedlstm.kernels.select import select_kernels

    os.environ["FUSEDLSTM_KERNEL"] = "cuda"
    return select_kernels(data_on_gpu=False) is cuda_kernels


def _run_simulator_suite():
    from fusedlstm.kernels import cuda as cuda_kernels

    return {
        "cases": {name: _run_case(cuda_kernels, case) for name, case in CASES.items()},
        "validation": _validation_messages(cuda_kernels),
        "device_arrays": _device_array_run(cuda_kernels),
        "empty": _empty_runs(cuda_kernels),
        "cuda_switch_selects_cuda": _selected_under_cuda_switch(),
    }


# ---------------------------------------------------------------------------
# Simulator tests: the pytest side.


@pytest.fixture(scope="module")
def simulated():
    if SIMULATED:
        pytest.skip("already under the simulator: run without NUMBA_ENABLE_CUDASIM")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONUNBUFFERED="1",
               TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("FUSEDLSTM_KERNEL", None)
    done = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=SIMULATOR_TIMEOUT_S)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, (
        f"simulator run failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n"
        f"{done.stderr[-4000:]}")
    return json.loads(lines[-1])


@pytest.mark.parametrize("name", sorted(CASES))
def test_simulated_kernels_match_cpu_and_reference(simulated, name):
    errors = simulated["cases"][name]
    assert max(errors["cpu_states"]) <= STATE_TOL, errors
    assert max(errors["ref_states"]) <= STATE_TOL, errors
    assert max(errors["cpu_grads"]) <= GRAD_TOL, errors
    assert max(errors["ref_grads"]) <= GRAD_TOL, errors
    assert max(errors["inference_vs_training"]) == 0.0, errors
    assert errors["inference_saved_is_none"]
    assert errors["all_numpy"]


@pytest.mark.parametrize("name, expected", [
    ("xw_rank", "Expected `xw` of shape [N, T, 4H] with H >= 1. Received: xw.shape=(2, 20)"),
    ("xw_not_4h", "Expected `xw` of shape [N, T, 4H] with H >= 1. Received: xw.shape=(3, 2, 7)"),
    ("recurrent_kernel_shape", "Received: recurrent_kernel.shape=(5, 8)"),
    ("h0_shape", "Expected `h0` of shape [N, H] = (3, 5)"),
    ("mask_shape", "Expected `mask` of shape [N, T] = (3, 2)"),
    ("recurrent_mask_shape", "Received: recurrent_mask.shape=(4, 3, 4)"),
    ("device_dtype", "Expected `xw` of dtype float32. Received: xw.dtype=float64"),
    ("device_layout", "recurrent_kernel must be C-contiguous"),
    ("lanes", "lanes must be a power of two from 1 to 32; received 3"),
    ("block_size", "block_size must be a multiple of lanes=8 between 1 and 256; received 12"),
    ("cache_floats", "cache_floats must be between 0 and"),
    ("units_per_block", "units_per_block must be >= 1; received 0"),
    ("too_many_blocks", "units_per_block=2 needs 3 blocks for H=5, but a cooperative launch"),
    ("single_block_units", "single_block=True needs units_per_block >= H=5"),
    ("backward_without_saved", "Expected `saved` to be the (h_in, c_seq, gates)"),
])
def test_simulated_driver_rejects_bad_input(simulated, name, expected):
    message = simulated["validation"][name]
    assert message is not None and expected in message, message


def test_simulated_device_arrays_stay_on_device(simulated):
    result = simulated["device_arrays"]
    assert result["returns_device_arrays"]
    assert result["max_error"] == 0.0


def test_simulated_empty_batch_and_sequence_launch_nothing(simulated):
    assert simulated["empty"] == {f"N{N}_T{T}_{place}": True for N, T in ((0, 4), (2, 0))
                                  for place in ("host", "device")}


def test_simulated_cuda_switch_runs_cuda_kernels_on_cpu_data(simulated):
    assert simulated["cuda_switch_selects_cuda"]


# ---------------------------------------------------------------------------
# Kernel selection (no simulator needed).


def test_select_kernels(monkeypatch):
    from fusedlstm.kernels import cuda as cuda_kernels
    from fusedlstm.kernels.select import select_kernels

    monkeypatch.setenv("FUSEDLSTM_KERNEL", "cpu")
    assert select_kernels(data_on_gpu=True) is cpu
    monkeypatch.setenv("FUSEDLSTM_KERNEL", "cuda")
    assert select_kernels(data_on_gpu=False) is cuda_kernels
    monkeypatch.delenv("FUSEDLSTM_KERNEL")
    assert select_kernels(data_on_gpu=False) is cpu
    assert select_kernels(data_on_gpu=True) is (cuda_kernels if cuda.is_available() else cpu)


def test_select_kernels_rejects_unknown_value(monkeypatch):
    from fusedlstm.kernels.select import select_kernels

    monkeypatch.setenv("FUSEDLSTM_KERNEL", "gpu")
    with pytest.raises(ValueError, match=r"one of auto, cpu, cuda; received 'gpu'"):
        select_kernels(data_on_gpu=True)


# ---------------------------------------------------------------------------
# The GPU scripts: benchmarks/gpu/checks.py (subcommands) and the two it runs.


@pytest.mark.parametrize("script, command, options", [
    ("checks.py", "kernels", ("--small", "--skip-sanitizers", "--out")),
    ("checks.py", "layer", ("--batches", "--skip-training", "--out")),
    ("checks.py", "all", ("--small", "--batches", "--repeats")),
    ("kernels.py", None, ("--small", "--skip-sanitizers", "--skip-timings")),
    ("layer.py", None, ("--batches", "--units", "--skip-training")),
])
def test_gpu_benchmark_script_help(script, command, options):
    path = ROOT / "benchmarks" / "gpu" / script
    done = subprocess.run([sys.executable, str(path)] + ([command] if command else []) +
                          ["--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in options:
        assert option in done.stdout


# ---------------------------------------------------------------------------
# Real GPU: multi-block cooperative launches.


@requires_gpu
@pytest.mark.parametrize("N, H, T, launch", [
    (3, 64, 5, dict(single_block=False, units_per_block=2)),
    (33, 200, 4, dict(single_block=False)),
    (5, 96, 3, dict(single_block=False, units_per_block=8, cache_floats=300)),
    (4, 31, 6, dict(single_block=True)),
    (2, 1024, 3, dict()),
])
@pytest.mark.parametrize("masked", [False, True])
def test_gpu_kernels_match_cpu(N, H, T, launch, masked):
    from fusedlstm.kernels import cuda as cuda_kernels

    x = _case_inputs(T=T, N=N, H=H, mask="ragged" if masked else None, dropout=masked,
                     seed=N + H)
    common = (x["mask"], x["recurrent_mask"], 0, 1, masked)
    fwd_args = (x["xw"], x["recurrent_kernel"], x["h0"], x["c0"]) + common + (True,)
    got = cuda_kernels.forward(*fwd_args, **launch)
    want = xw_kernels.forward(*fwd_args)
    assert max(_max_errors(got[:3] + got[3], want[:3] + want[3])) <= STATE_TOL
    grads = cuda_kernels.backward(x["recurrent_kernel"], *common, got[3], x["d_outputs"],
                                  x["d_h_n"], x["d_c_n"], **launch)
    want_grads = xw_kernels.backward(x["recurrent_kernel"], *common, want[3], x["d_outputs"],
                                     x["d_h_n"], x["d_c_n"])
    assert max(_max_errors(grads, want_grads)) <= GRAD_TOL


@requires_gpu
def test_gpu_torch_tensors_on_their_stream():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    from fusedlstm.kernels import cuda as cuda_kernels

    x = _case_inputs(T=4, N=3, H=48)
    args = (x["xw"], x["recurrent_kernel"], x["h0"], x["c0"], None, None, 0, 1, False, True)
    want = xw_kernels.forward(*args)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        tensors = [torch.from_numpy(a).cuda() for a in args[:4]]
        got = cuda_kernels.forward(*tensors, *args[4:], stream=stream.cuda_stream)
        outputs = torch.as_tensor(got[0], device="cuda")
    stream.synchronize()
    assert max(_max_errors([outputs.cpu().numpy()], [want[0]])) <= STATE_TOL


if __name__ == "__main__":
    print(json.dumps(_run_simulator_suite()))
