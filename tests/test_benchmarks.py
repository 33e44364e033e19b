"""The benchmarks' own logic, without timing anything: the kernel problem against the
drivers' API (a NumPy stand-in of it), the driver stubs of the breakdown, the reports'
arithmetic and targets, the README table, and the GEMM check's tolerance."""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cases  # noqa: E402
import kernel_report  # noqa: E402
import run_cpu  # noqa: E402
import test_cpu_breakdown  # noqa: E402
import test_cpu_gemm  # noqa: E402
from fusedlstm.kernels.cpu import drivers  # noqa: E402
from fusedlstm.kernels.gates import ACTIVATION_CODES  # noqa: E402
from fusedlstm.testing import reference  # noqa: E402

BACKEND_INDEPENDENT = True
NAMES = {code: name for name, code in ACTIVATION_CODES.items()}
F32 = np.float32


def standin_forward(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask,
                    recurrent_mask, activation, recurrent_activation, zero_output_for_mask,
                    training, out=None):
    """The drivers' forward API in NumPy (the float64 reference), checking each argument
    where the API puts it."""
    N, T, C = x.shape
    H = recurrent_kernel.shape[0]
    assert kernel.shape == (C, 4 * H) and bias.shape == (4 * H,)
    assert recurrent_kernel.shape == (H, 4 * H) and h0.shape == c0.shape == (N, H)
    assert mask is None or mask.shape == (N, T)
    assert input_mask is None or input_mask.shape == (4, N, C)
    assert recurrent_mask is None or recurrent_mask.shape == (4, N, H)
    assert isinstance(zero_output_for_mask, bool) and isinstance(training, bool)
    outputs, h, c, tape = reference.lstm_forward(
        x, kernel, recurrent_kernel, bias, h0, c0, mask, recurrent_mask, input_mask,
        NAMES[activation], NAMES[recurrent_activation],
        zero_output_for_mask=zero_output_for_mask)
    return outputs.astype(F32), h.astype(F32), c.astype(F32), tape if training else None


def standin_backward(x, kernel, recurrent_kernel, mask, input_mask, recurrent_mask,
                     activation, recurrent_activation, zero_output_for_mask, saved, d_outputs,
                     d_h_n, d_c_n, out=None):
    """The drivers' backward API in NumPy: (d_x, d_kernel, d_recurrent_kernel, d_bias,
    d_h0, d_c0)."""
    assert saved is not None and d_outputs.shape[:2] == x.shape[:2]
    grads = reference.lstm_backward(saved, d_outputs, d_h_n, d_c_n, NAMES[activation],
                                    NAMES[recurrent_activation], zero_output_for_mask)
    return tuple(grads[k].astype(F32)
                 for k in ("x", "kernel", "recurrent_kernel", "bias", "h0", "c0"))


@pytest.fixture
def standin_drivers(monkeypatch):
    from fusedlstm.kernels import cpu

    for module in (cpu, drivers):
        monkeypatch.setattr(module, "forward", standin_forward)
        monkeypatch.setattr(module, "backward", standin_backward)


def test_kernel_problem_calls_the_drivers_api(standin_drivers):
    p = cases.KernelProblem("S1")
    N, T, C, H = cases.SHAPES["S1"]
    assert p.forward(training=False)[3] is None
    d_x, d_kernel, d_recurrent_kernel, d_bias, d_h0, d_c0 = p.train_step()
    assert (d_x.shape, d_kernel.shape, d_recurrent_kernel.shape, d_bias.shape) == (
        (N, T, C), (C, 4 * H), (H, 4 * H), (4 * H,))
    want = reference.lstm_backward(reference.lstm_forward(
        p.x, p.kernel, p.recurrent_kernel, p.bias)[3], p.d_outputs, p.zeros, p.zeros)
    np.testing.assert_allclose(d_kernel, want["kernel"], rtol=1e-5, atol=1e-5)


def test_stubbed_drivers_replace_every_reference_then_restore(standin_drivers, monkeypatch):
    from fusedlstm.kernels import cpu

    holder = types.ModuleType("fusedlstm._holds_the_drivers")
    holder.run_forward, holder.unrelated = drivers.forward, len
    monkeypatch.setitem(sys.modules, holder.__name__, holder)
    p = cases.KernelProblem("S1")
    with test_cpu_breakdown.stubbed_drivers(p) as calls:
        assert cpu.forward is drivers.forward is holder.run_forward
        assert holder.run_forward is not standin_forward and holder.unrelated is len
        arguments = (p.x, p.kernel, p.bias, p.recurrent_kernel, p.zeros, p.zeros, None, None,
                     None, *p.codes, False)
        assert holder.run_forward(*arguments, True)[3] is not None
        assert cpu.forward(*arguments, training=False)[3] is None
        assert len(cpu.backward(p.x, p.kernel, p.recurrent_kernel, None, None, None, *p.codes,
                                False, p.saved, p.d_outputs, p.zeros, p.zeros)) == 6
        assert calls == {"forward": 2, "backward": 1}
    assert cpu.forward is drivers.forward is holder.run_forward is standin_forward
    assert cpu.backward is drivers.backward is standin_backward


def benchmark_json(entries, facts=None):
    """A pytest-benchmark JSON holding `(extra_info, median seconds)` entries."""
    stats = [{"median": s, "min": s, "max": s, "iqr": 0.0, "rounds": 7} for _, s in entries]
    return {"machine_info": {"facts": facts or {}},
            "benchmarks": [{"extra_info": info, "stats": st}
                           for (info, _), st in zip(entries, stats)]}


def peak_entry(library, seconds, flops=2e9):
    return {"kind": "peak", "library": library, "threads": 2, "flops": flops}, seconds


def test_breakdown_parts_come_from_one_benchmark_each():
    flops = cases.layer_flops(cases.SHAPES["S2"], "fwd")

    def part(name, seconds, threads=None):
        info = {"kind": "breakdown", "shape": "S2", "mode": "fwd", "part": name,
                "flops": flops}
        if threads:
            info.update(threads=threads, thread_count=2 if threads == "all_threads" else 1)
        return info, seconds

    runs = [benchmark_json([part("layer", 10.2e-3), part("kernel", 10e-3, "all_threads"),
                            part("kernel", 19e-3, "1thread"), part("outside_kernel", 80e-6),
                            peak_entry("numpy", 4e-3)]),
            benchmark_json([peak_entry("torch", 5e-3)])]
    peak = kernel_report.peak_sgemm(runs)
    assert peak == {"numpy": 500.0, "torch": 400.0, "best": 500.0}
    [row] = kernel_report.breakdown_rows(runs, peak)
    assert row["outside_kernel_us"] == pytest.approx(80)
    assert row["parts_over_layer"] == pytest.approx((10e-3 + 80e-6) / 10.2e-3)
    assert row["kernel_gflops"] == pytest.approx(flops / 10e-3 / 1e9)
    assert row["kernel_1thread_ms"] == pytest.approx(19) and row["kernel_threads"] == 2
    assert row["floor_ms"] == pytest.approx(flops / 500e9 * 1e3)
    markdown = kernel_report.breakdown_markdown([row])
    assert "missed by 30 us" in markdown and "| 10.00 | 80 |" in markdown


def layer_entry(implementation, shape, mode, case, seconds):
    NTCH = cases.SHAPES[shape]
    return {"implementation": implementation, "shape": shape, "mode": mode, "case": case,
            "NTCH": NTCH, "flops": cases.layer_flops(NTCH, mode), "threads": {}}, seconds


FACTS = {"cpu": {"vendor_id": "AuthenticAMD", "family": "25", "model": "17",
                 "stepping": "1", "model_name": "AMD EPYC"},
         "cpu_model": "AMD EPYC", "cpu_id": "AuthenticAMD family 25 model 17 stepping 1",
         "cpus_usable": 2, "python": "3.12", "versions": {"keras": "3"}, "threads": {},
         "blas": [], "openmp": [], "cpu_vector_flags": [], "environment": {}}


def synthetic_runs():
    """Every implementation at S1 fwd plain, fused at 0.6x torch (target 0.67) and 1.2x
    ONNX Runtime (target 1); S2 masked training at 0.4x stock (target 0.5)."""
    times = {"tensorflow/fusedlstm": 0.6, "tensorflow/keras": 3.0, "torch.nn.LSTM": 1.0,
             "onnxruntime": 0.5, "torch/fusedlstm": 0.9, "torch/keras": 4.0,
             "jax/fusedlstm": 0.7, "jax/keras": 1.0}
    runs = {name: benchmark_json([layer_entry(name, "S1", "fwd", "plain", t * 1e-3)], FACTS)
            for name, t in times.items()}
    runs["tensorflow/fusedlstm"]["benchmarks"] += benchmark_json(
        [layer_entry("tensorflow/fusedlstm", "S2", "train", "mask_left", 20e-3)])["benchmarks"]
    runs["tensorflow/keras"]["benchmarks"] += benchmark_json(
        [layer_entry("tensorflow/keras", "S2", "train", "mask_left", 50e-3)])["benchmarks"]
    runs["torch.nn.LSTM"]["benchmarks"] += benchmark_json(
        [peak_entry("torch", 10e-3)])["benchmarks"]
    return runs


def test_cpu_tables_judge_each_target():
    result = run_cpu.cpu_result(synthetic_runs(), quick=False)
    markdown = run_cpu.cpu_markdown(result)
    s1 = next(line for line in markdown.splitlines() if line.startswith("| S1 | fwd | plain | "))
    assert "0.60x" in s1 and "1.20x" in s1 and "missed: fused / ORT 1.20 > 1" in s1
    assert "torch" not in s1.split("missed:")[1]  # 0.60 <= 0.67
    masked = next(line for line in markdown.splitlines() if "mask_left" in line)
    assert masked.endswith("| 0.40x | - | - | met |")
    other = next(line for line in markdown.splitlines() if line.startswith("| S1 | fwd | 0.90"))
    assert "missed: JAX: fused / stock 0.70 > 0.67" in other
    floor = cases.layer_flops(cases.SHAPES["S1"], "fwd") / 200e9 * 1e3  # torch peak 200
    assert f"| {floor:.3f} | 0.60 |" in s1


def test_cpu_result_file_and_readme_table(tmp_path):
    result = run_cpu.cpu_result(synthetic_runs(), quick=False)
    stem = run_cpu.write_cpu_result(str(tmp_path), result)
    assert Path(stem).name == "cpu-amd-25-17"
    assert json.loads(Path(stem + ".json").read_text())["rows"][0]["rounds"] == 7
    (tmp_path / "cpu-2026-11-22.json").write_text("not a CPU result file")
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{run_cpu.README_BEGIN}\nold table\n{run_cpu.README_END}\nafter\n")
    run_cpu.update_readme(str(tmp_path), str(readme))
    text = readme.read_text()
    assert "old table" not in text and text.startswith("before\n") and text.endswith("after\n")
    assert "AMD EPYC (AuthenticAMD family 25 model 17 stepping 1)" in text
    assert "`benchmarks/results/cpu-amd-25-17.json`" in text and text.count("#### ") == 1


def test_gemm_check_allows_rounding_of_deep_sums_and_catches_a_wrong_product():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 6400)).astype(F32)  # weight gradients at S3: T * N = 6400
    b = rng.standard_normal((6400, 64)).astype(F32)
    out = a @ b
    test_cpu_gemm.assert_product_close(a, b, out)
    out[3, 5] += 0.01 * np.abs(out).max()
    with pytest.raises(AssertionError, match="float32 rounding allows"):
        test_cpu_gemm.assert_product_close(a, b, out)
