"""Tests for `python -m fusedlstm` and its subcommands `check`, `demo` and `explain`.

The main job and the demo run as real subprocesses; the rest call
`fusedlstm.cli.main` in this process, which is faster.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

import fusedlstm
from fusedlstm import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_module(*args, cwd=None):
    """Runs `python -m fusedlstm ARGS`; returns the `CompletedProcess`."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "fusedlstm", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def run_main(capsys, *args):
    """Calls `cli.main(args)`; returns `(exit code, stdout, stderr)`."""
    try:
        code = cli.main(list(args))
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(stderr):
    """Our error lines, without the framework's start-up logging."""
    return [line for line in stderr.splitlines() if "error:" in line]


def assert_valid_png(path):
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == PNG_SIGNATURE
    assert header[12:16] == b"IHDR"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert width > 100 and height > 100


@pytest.mark.skipif(keras.backend.backend() == "jax",
                    reason="the main job's timings (report._step_functions) have no JAX branch yet")
def test_main_job_reports_environment_parity_and_timings(tmp_path):
    json_path, png_path = tmp_path / "check.json", tmp_path / "check.png"
    result = run_module("--shapes", "2,5,3,4", "1,3,2,2", "--runs", "1",
                        "--json", str(json_path), "--png", str(png_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for label in ("keras backend", "keras ", "numba", "device", "kernel", "fused path"):
        assert f"  {label}" in out
    assert f"  keras          {keras.__version__}" in out
    assert f"  {keras.backend.backend()} " in out
    assert "PASS  get_weights() byte-identical" in out
    for name in ("outputs", "gradients", "outputs, masked", "gradients, masked"):
        assert f"PASS  {name} " in out
    assert "FAIL" not in out
    assert "forward (training=False)" in out and "training step" in out
    table_rows = [line.split() for line in out.splitlines() if line.endswith("x")]
    assert [row[:4] for row in table_rows] == [["2", "5", "3", "4"], ["1", "3", "2", "2"]]
    assert all(len(row) == 10 for row in table_rows)

    report = json.loads(json_path.read_text())
    assert report["environment"]["keras"] == keras.__version__
    assert report["environment"]["fusedlstm"] == fusedlstm.__version__
    assert report["parity"]["passed"] is True
    assert len(report["parity"]["checks"]) == 5
    assert all(check["passed"] for check in report["parity"]["checks"])
    assert report["timings"]["runs"] == 1
    first = report["timings"]["results"][0]
    assert (first["N"], first["T"], first["C"], first["H"]) == (2, 5, 3, 4)
    for mode in ("forward", "train"):
        assert first[f"{mode}_keras_ms"] > 0 and first[f"{mode}_fused_ms"] > 0
        assert first[f"{mode}_speedup"] == pytest.approx(
            first[f"{mode}_keras_ms"] / first[f"{mode}_fused_ms"])
    assert_valid_png(png_path)
    assert "Traceback" not in result.stderr


def test_check_exits_1_when_parity_fails(capsys, monkeypatch, tmp_path):
    stock_inner_loop = fusedlstm.LSTM.inner_loop

    def off_by_one_percent(self, *args, **kwargs):
        last, outputs, states = stock_inner_loop(self, *args, **kwargs)
        return last * 1.01, outputs * 1.01, states

    monkeypatch.setattr(fusedlstm.LSTM, "inner_loop", off_by_one_percent)
    json_path = tmp_path / "failed.json"
    code, out, _ = run_main(capsys, "check", "--shapes", "1,2,3,4", "--runs", "1",
                            "--json", str(json_path))
    assert code == 1
    assert "PASS  get_weights() byte-identical" in out
    assert "FAIL  outputs " in out
    assert "Parity FAILED: timings skipped." in out
    report = json.loads(json_path.read_text())
    assert report["parity"]["passed"] is False
    assert report["timings"]["results"] == []


def test_demo_trains_both_layers_and_draws_png(tmp_path):
    png_path = tmp_path / "demo.png"
    result = run_module("demo", "--epochs", "2", "--units", "4", "--window", "6",
                        "--png", str(png_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Mauna Loa CO2, 526 months" in out
    assert "Training with keras.layers.LSTM" in out and "Training with fusedlstm.LSTM" in out
    assert out.count("Epoch 2/2") == 2
    epochs = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert len(epochs) == 2
    for _, keras_loss, fused_loss, keras_s, fused_s in epochs:
        assert float(keras_loss) == pytest.approx(float(fused_loss), rel=1e-3)
        assert float(keras_s) >= 0 and float(fused_s) >= 0
    # Epoch 1 includes tracing; a jitted epoch 2 can print 0.00 seconds.
    assert float(epochs[0][3]) > 0 and float(epochs[0][4]) > 0
    for label in ("keras.layers.LSTM", "fusedlstm.LSTM", "last month (naive)"):
        assert any(line.strip().startswith(label) for line in out.splitlines()
                   if "RMSE" not in line)
    assert_valid_png(png_path)


@pytest.mark.parametrize("C, H, total, shapes", [
    (4, 2, 56, ["(4, 8)", "(2, 8)", "(8,)"]),
    (3, 2, 48, ["(3, 8)", "(2, 8)", "(8,)"]),
])
def test_explain_shows_shapes_ranges_and_count(capsys, C, H, total, shapes):
    code, out, _ = run_main(capsys, "explain", "--input-dim", str(C), "--units", str(H))
    assert code == 0
    for shape in shapes:
        assert shape in out
    for symbolic, numeric in (("[:, 0:H]", "[:, 0:2]"), ("[:, H:2H]", "[:, 2:4]"),
                              ("[:, 2H:3H]", "[:, 4:6]"), ("[:, 3H:4H]", "[:, 6:8]")):
        assert symbolic in out and numeric in out
    assert "4 * ((C + H) * H + H)" in out
    assert f"4 * (({C} + {H}) * {H} + {H})" in out
    assert out.rstrip().splitlines()[-3].endswith(f"= {total}")
    assert "sequence length" in out


def test_explain_says_timesteps_change_nothing(capsys):
    code, out, _ = run_main(capsys, "explain", "--input-dim", "4", "--units", "2",
                            "--timesteps", "100")
    assert code == 0
    assert "T = 100 changes none of this" in out
    assert "= 56" in out


def test_explain_model_lists_every_lstm(capsys, tmp_path):
    model = keras.Sequential([
        keras.Input((5, 3)),
        keras.layers.Bidirectional(fusedlstm.LSTM(2, return_sequences=True)),
        keras.layers.LSTM(4, use_bias=False),
        keras.layers.Dense(1),
    ])
    path = tmp_path / "model.keras"
    model.save(path)
    code, out, _ = run_main(capsys, "explain", "--model", str(path))
    assert code == 0
    sections = [line for line in out.splitlines() if line.startswith("== ")]
    assert len(sections) == 3
    assert sum("(fusedlstm.LSTM)" in line for line in sections) == 2
    assert sum("(keras.layers.LSTM)" in line for line in sections) == 1
    assert out.count("= 48") == 2  # each direction: C=3, H=2
    assert "4 * ((4 + 4) * 4)" in out and "= 128" in out  # C=4 (2 + 2), H=4, no bias
    assert f"3 LSTM layer(s), 224 LSTM parameters of the model's {model.count_params()}." in out


@pytest.mark.parametrize("args, message", [
    (["bogus"], "invalid choice: 'bogus'"),
    (["--shapes", "1,2,x,4"], "argument --shapes: expected N,T,C,H"),
    (["check", "--runs", "0"], "argument --runs: expected a positive integer, got '0'"),
    (["explain", "--input-dim", "-1", "--units", "2"], "argument --input-dim"),
    (["explain", "--units", "2"], "explain needs --input-dim C and --units H"),
    (["--json", "/no/such/folder/r.json"], "no such folder"),
    (["explain", "--model", "missing.keras"], "no such file: missing.keras"),
])
def test_user_errors_print_one_line(capsys, args, message):
    code, out, err = run_main(capsys, *args)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_unreadable_model_prints_one_line(capsys, tmp_path):
    path = tmp_path / "notes.keras"
    path.write_text("not a model")
    code, _, err = run_main(capsys, "explain", "--model", str(path))
    assert code == 2
    assert err.count("\n") == 1 and f"cannot load {path} as a Keras model" in err


def test_errors_from_the_command_line_have_no_traceback(tmp_path):
    for args, message in ((["bogus"], "invalid choice"),
                          (["explain", "--model", str(tmp_path / "x.keras")], "no such file")):
        result = run_module(*args)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert len(error_lines(result.stderr)) == 1
        assert message in error_lines(result.stderr)[0]


def test_device_gpu_without_gpu_is_one_line(capsys):
    from fusedlstm import report

    if report.gpu_name() is not None:
        pytest.skip("a GPU is visible")
    code, out, err = run_main(capsys, "--device", "gpu", "--runs", "1")
    assert code == 2
    assert out == ""
    assert err.strip() == (f"fusedlstm: error: --device gpu: no GPU is visible to the "
                           f"{keras.backend.backend()} backend on this machine")
