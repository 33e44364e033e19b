"""`python benchmarks/gpu_run.py --dry-run`: the one-command GPU script, on the CPU.

The dry run goes through every stage of the GPU run with the CUDA simulator
and tiny shapes (no install, no GPU timing targets) and writes the results
JSON and Markdown to its output folder only.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BACKEND_INDEPENDENT = True  # see conftest.py

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_run.py"
COMMITTED = ROOT / "benchmarks" / "results" / "gpu-h200.json"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run")
    committed_before = COMMITTED.read_bytes() if COMMITTED.exists() else None
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("FUSEDLSTM_KERNEL", None)
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    committed_after = COMMITTED.read_bytes() if COMMITTED.exists() else None
    return out, done, committed_before == committed_after


def test_dry_run_passes_and_writes_its_results_to_out_only(dry_run):
    out, done, committed_untouched = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert committed_untouched
    for name in ("gpu-h200.json", "gpu-h200.md", "stage_kernel_checks.log"):
        assert (out / name).exists(), sorted(p.name for p in out.iterdir())
    assert len(done.stdout) < 12000
    assert "verified=False" in done.stdout


def test_dry_run_report_is_never_verified_and_every_check_ran(dry_run):
    report = json.loads((dry_run[0] / "gpu-h200.json").read_text())
    assert report["verified"] is False
    assert report["kind"].startswith("dry run")
    statuses = {name: stage["status"] for name, stage in report["stages"].items()}
    assert statuses["install"] == "skipped"
    for name in ("kernel_tests", "kernel_checks", "layer_checks", "timings"):
        assert statuses[name] == "passed", report["stages"]
    assert statuses["sanitizers"] in ("passed", "not available")


def test_dry_run_parity_errors_are_below_tolerance(dry_run):
    checks = json.loads((dry_run[0] / "gpu-h200.json").read_text())["checks"]
    small = checks["kernel_checks"]["small"]
    assert {row["masked"] for row in small} == {False, True}
    assert max(row["max_abs"] for row in small) <= 1e-4
    torch_rows = checks["kernel_checks"]["torch_rows"]
    assert torch_rows and all(max(row["cpu_max_abs"].values()) <= 1e-4 for row in torch_rows)
    layer_rows = checks["layer_checks"]["rows"]
    cases = {row["case"] for row in layer_rows}
    assert {"holes", "recurrent_dropout_left_padded"} <= cases
    assert all(row["fused_vs_stock"] <= row["tolerance"] for row in layer_rows)
    assert any("fused_vs_float64" in row for row in layer_rows)


def test_dry_run_times_every_cell_beside_the_model(dry_run):
    report = json.loads((dry_run[0] / "gpu-h200.json").read_text())
    rows = report["timings"]
    assert {(row["mode"], row["N"], row["H"]) for row in rows} == {
        ("forward", 2, 4), ("train", 2, 4)}
    for row in rows:
        assert row["fused_ms"] > 0 and row["stock_ms"] > 0 and row["torch_lstm_ms"] > 0
        assert row["model_fused_ms"] > 0
        assert row["model_over_measured_fused"] == pytest.approx(
            row["model_fused_ms"] / row["fused_ms"], rel=1e-2)
    assert "model/measured" in (dry_run[0] / "gpu-h200.md").read_text()
