"""Tests for `python -m fusedlstm` and its subcommands `check`, `demo` and `explain`.

The main job, the demo and a few more run as real subprocesses, started as a
user would start them (no `TF_CPP_MIN_LOG_LEVEL`); the rest call
`fusedlstm.cli.main` in this process, which is faster.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

import fusedlstm
from fusedlstm.cli import explain, layout_figure, quiet_start
from fusedlstm.cli import main as cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_module(*args, cwd=None, combined=False):
    """Runs `python -m fusedlstm ARGS`; returns the `CompletedProcess`.

    With `combined`, stderr goes into `stdout` as it comes, the way a
    terminal shows both.
    """
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "fusedlstm", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if combined else subprocess.PIPE,
                          text=True, env=env, cwd=cwd, timeout=300)


def framework_logging(output):
    """The lines of TensorFlow's and absl's C++ logging in `output`."""
    return [line for line in output.splitlines()
            if quiet_start.FRAMEWORK_LOGGING.fullmatch(line) or "E0000" in line]


def run_main(capsys, *args):
    """Calls `cli.main(args)`; returns `(exit code, stdout, stderr)`."""
    try:
        code = cli.main(list(args))
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_valid_png(path):
    """Asserts that `path` is a PNG image of a sane size; returns `(width, height)`."""
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == PNG_SIGNATURE
    assert header[12:16] == b"IHDR"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert 100 < width < 5000 and 100 < height < 5000
    return width, height


def figure_texts(figure):
    """Every string drawn on a matplotlib `figure`."""
    import matplotlib.text

    return [text.get_text() for text in figure.findobj(matplotlib.text.Text) if text.get_text()]


def test_main_job_reports_environment_parity_and_timings(tmp_path):
    json_path, png_path = tmp_path / "check.json", tmp_path / "check.png"
    result = run_module("--shapes", "2,5,3,4", "1,3,2,2", "--runs", "1",
                        "--json", str(json_path), "--png", str(png_path), combined=True)
    out = result.stdout
    assert result.returncode == 0, out
    assert out.splitlines()[0] == "Environment"
    assert framework_logging(out) == []
    for label in ("keras backend", "keras ", "numba", "device", "kernel", "fused path"):
        assert f"  {label}" in out
    assert f"  keras          {keras.__version__}" in out
    assert f"  {keras.backend.backend()} " in out
    assert "PASS  get_weights() byte-identical" in out
    for name in ("outputs", "gradients", "outputs, masked", "gradients, masked"):
        assert f"PASS  {name} " in out
    assert "FAIL" not in out
    assert "forward (training=False)" in out and "training step" in out
    table_rows = [line.split() for line in out.splitlines()
                  if line.endswith("x") and line.split()[0].isdigit()]
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
    # The printed table and the JSON report are the same measurement: each printed
    # time and speed-up is the report's, rounded.
    printed = table_rows[0]
    for k, mode in enumerate(("forward", "train")):
        assert first[f"{mode}_keras_ms"] > 0 and first[f"{mode}_fused_ms"] > 0
        assert printed[4 + 3 * k:7 + 3 * k] == [
            f"{first[f'{mode}_keras_ms']:.2f}", f"{first[f'{mode}_fused_ms']:.2f}",
            f"{first[f'{mode}_speedup']:.2f}x"]
    assert_valid_png(png_path)
    assert "Traceback" not in out


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
        keras.layers.Bidirectional(fusedlstm.LSTM(2, return_sequences=True, name="words"),
                                   name="both"),
        keras.layers.LSTM(4, use_bias=False, name="top"),
        keras.layers.Dense(1),
    ], name="tagger")
    path, png_path = tmp_path / "model.keras", tmp_path / "layout.png"
    model.save(path)
    code, out, _ = run_main(capsys, "explain", "--model", str(path), "--png", str(png_path))
    assert code == 0
    assert out.rstrip().endswith(f"Wrote {png_path}")
    assert_valid_png(png_path)
    sections = [line for line in out.splitlines() if line.startswith("== ")]
    assert len(sections) == 3
    assert sum("(fusedlstm.LSTM)" in line for line in sections) == 2
    assert sum("(keras.layers.LSTM)" in line for line in sections) == 1
    assert out.count("= 48") == 2  # each direction: C=3, H=2
    assert "4 * ((4 + 4) * 4)" in out and "= 128" in out  # C=4 (2 + 2), H=4, no bias
    assert f"3 LSTM layer(s), 224 LSTM parameters of the model's {model.count_params()}." in out

    _, shapes = explain.load_lstm_shapes(str(path))
    texts = figure_texts(layout_figure.draw_layout(shapes))
    titles = [text for text in texts if text.startswith("tagger/")]
    assert titles == [
        f"tagger/both/{direction}_words (fusedlstm.LSTM): C = 3 input features, H = 2 units"
        for direction in ("forward", "backward")
    ] + ["tagger/top (keras.layers.LSTM): C = 4 input features, H = 4 units"]
    parameters = [text for text in texts if text.startswith("Parameters")]
    assert parameters == [
        "Parameters = 4 * ((C + H) * H + H) = 4 * ((3 + 2) * 2 + 2) = 4 * 12 = 48\n"
        "           = 24 (kernel) + 16 (recurrent_kernel) + 8 (bias)"] * 2 + [
        "Parameters = 4 * ((C + H) * H) = 4 * ((4 + 4) * 4) = 4 * 32 = 128\n"
        "           = 64 (kernel) + 64 (recurrent_kernel)"]
    assert sum(text.startswith("bias\n") for text in texts) == 2
    assert texts[-1].startswith("The sequence length appears nowhere")


def test_explain_png_draws_the_three_arrays_to_scale(capsys, tmp_path):
    png_path = tmp_path / "layout.png"
    code, out, _ = run_main(capsys, "explain", "--input-dim", "4", "--units", "2",
                            "--timesteps", "100", "--png", str(png_path))
    assert code == 0
    assert out.rstrip().endswith(f"Wrote {png_path}")
    width, height = assert_valid_png(png_path)
    assert width > height

    figure = layout_figure.draw_layout([explain.LstmShape(4, 2)], timesteps=100)
    texts = figure_texts(figure)
    for expected in ("LSTM with C = 4 input features, H = 2 units",
                     "kernel\n(C, 4H) = (4, 8)", "recurrent_kernel\n(H, 4H) = (2, 8)",
                     "bias\n(4H,) = (8,)",
                     "i: input gate\n[:, 0:2]", "f: forget gate\n[:, 2:4]",
                     "c: cell candidate\n[:, 4:6]", "o: output gate\n[:, 6:8]",
                     "4 gates * H = 4 * 2\n= 8 columns",
                     "Parameters = 4 * ((C + H) * H + H) = 4 * ((4 + 2) * 2 + 2) = 4 * 14 = 56\n"
                     "           = 32 (kernel) + 16 (recurrent_kernel) + 8 (bias)"):
        assert expected in texts
    counts = [text.split("\n")[0] for text in texts if " * 8 = " in text]
    assert counts == ["4 * 8 = 32", "2 * 8 = 16", "1 * 8 = 8"]
    assert [texts.count(letter) for letter in "ifco"] == [3, 3, 3, 3]
    assert texts[-1].startswith("The sequence length (T = 100) appears nowhere")


def test_explain_png_keeps_the_arrays_to_scale():
    figure = layout_figure.draw_layout([explain.LstmShape(32, 128)])
    ax = figure.axes[0]
    blocks = [(round(patch.get_width(), 6), round(patch.get_height(), 6))
              for patch in ax.patches]
    kernel, recurrent, bias = blocks[0:4], blocks[4:8], blocks[8:12]
    assert len(set(kernel)) == len(set(recurrent)) == len(set(bias)) == 1
    (width, kernel_height), (_, recurrent_height) = kernel[0], recurrent[0]
    assert recurrent_height / kernel_height == pytest.approx(128 / 32)
    assert recurrent_height / (4 * width) == pytest.approx(128 / 512)
    assert "1 * 512 = 512\none value per column\n(drawn thicker than to scale)" in (
        figure_texts(figure))


def test_explain_layout_torch_maps_each_block(capsys):
    code, out, _ = run_main(capsys, "explain", "--input-dim", "4", "--units", "2",
                            "--layout", "torch")
    assert code == 0
    lines = [" ".join(line.split()) for line in out.splitlines()]
    for gate, rows in (("i input gate", "0:2"), ("f forget gate", "2:4"),
                       ("c cell candidate (g)", "4:6"), ("o output gate", "6:8")):
        assert f"{gate} weight_ih_l0[{rows}, :] = kernel[:, {rows}].T" in lines
        assert f"weight_hh_l0[{rows}, :] = recurrent_kernel[:, {rows}].T" in lines
        assert f"bias_ih_l0[{rows}] + bias_hh_l0[{rows}] = bias[{rows}]" in lines
    assert "weight_ih_l0 (4H, C) = (8, 4) kernel (C, 4H) = (4, 8)" in lines
    assert "weight_hh_l0 (4H, H) = (8, 2) recurrent_kernel (H, 4H) = (2, 8)" in lines
    assert ("Parameters: torch 4 * ((C + H) * H + 2H) = 64, "
            "Keras 4 * ((C + H) * H + H) = 56:") in lines


def test_explain_layout_torch_without_bias(capsys, tmp_path):
    path = tmp_path / "model.keras"
    keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(4, use_bias=False)]).save(path)
    code, out, _ = run_main(capsys, "explain", "--model", str(path), "--layout", "torch")
    assert code == 0
    assert "torch.nn.LSTM(3, 4, bias=False, batch_first=True)" in out
    assert "bias_ih_l0" not in out
    assert "Parameters: 4 * (C + H) * H = 112 in both." in out


@pytest.mark.parametrize("args, message", [
    (["bogus"], "invalid choice: 'bogus'"),
    (["--shapes", "1,2,x,4"], "argument --shapes: expected N,T,C,H"),
    (["check", "--runs", "0"], "argument --runs: expected a positive integer, got '0'"),
    (["explain", "--input-dim", "-1", "--units", "2"], "argument --input-dim"),
    (["explain", "--units", "2"], "explain needs --input-dim C and --units H"),
    (["--json", "/no/such/folder/r.json"], "no such folder"),
    (["explain", "--model", "missing.keras"], "no such file: missing.keras"),
    (["explain", "--input-dim", "4", "--units", "2", "--png", "/no/such/folder/l.png"],
     "argument --png: no such folder"),
    (["explain", "--png", "layout.png"], "explain needs --input-dim C and --units H"),
    (["explain", "--input-dim", "4", "--units", "2", "--layout", "jax"],
     "argument --layout: invalid choice: 'jax'"),
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


def test_errors_from_the_command_line_are_all_it_prints(tmp_path):
    for args, message in ((["bogus"], "invalid choice"),
                          (["explain", "--model", str(tmp_path / "x.keras")], "no such file")):
        result = run_module(*args, combined=True)
        assert result.returncode == 2
        lines = result.stdout.splitlines()
        assert len(lines) == 1 and message in lines[0]


def test_first_line_printed_is_its_own():
    result = run_module("explain", "--input-dim", "4", "--units", "2", combined=True)
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[0] == "LSTM with input_dim C = 4, units H = 2"
    assert framework_logging(result.stdout) == []


def test_library_import_loads_nothing_of_the_command_line():
    script = ("import sys, fusedlstm; fusedlstm.convert.to_stock, fusedlstm.LSTM; "
              "print(sorted(m for m in sys.modules if m.startswith('fusedlstm.')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = eval(done.stdout.strip().splitlines()[-1])
    assert "fusedlstm.layer" in loaded and "fusedlstm.convert" in loaded
    assert [m for m in loaded if m.startswith("fusedlstm.cli")] == []


FRAMEWORK_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795310808.403922   17369 port.cc:153] oneDNN custom operations are on.",
    "W0000 00:00:1795310808.403922   17369 cpu_feature_guard.cc:227] an absl warning",
    "2026-11-22 01:00:00.123456: I tensorflow/core/platform/cpu_feature_guard.cc:210] "
    "This TensorFlow binary is optimized to use available CPU instructions.",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
]
KEPT_LINES = [
    "/site-packages/keras/src/layers/layer.py:3: UserWarning: a warning that matters",
    "E0000 00:00:1795310808.4 17369 util.cc:131] an error-level line",
    "fusedlstm: error: a CLI error",
]


def test_held_stderr_writes_back_all_but_framework_logging(capfd):
    with quiet_start._stderr_held(quiet_start.FRAMEWORK_LOGGING):
        for line in FRAMEWORK_LINES[:3] + KEPT_LINES[:2] + FRAMEWORK_LINES[3:] + KEPT_LINES[2:]:
            os.write(2, f"{line}\n".encode())
        assert capfd.readouterr().err == ""
    assert capfd.readouterr().err.splitlines() == KEPT_LINES


def test_device_gpu_without_gpu_is_one_line(capsys):
    from fusedlstm.cli import environment

    if environment.gpu_name() is not None:
        pytest.skip("a GPU is visible")
    code, out, err = run_main(capsys, "--device", "gpu", "--runs", "1")
    assert code == 2
    assert out == ""
    assert err.strip() == (f"fusedlstm: error: --device gpu: no GPU is visible to the "
                           f"{keras.backend.backend()} backend on this machine")


def test_compile_fills_the_cache_then_loads_from_it(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "fusedlstm", "compile", "--inference", "--activation", "relu",
               "--recurrent-activation", "hard_sigmoid"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    second = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:]
    assert "relu / hard_sigmoid: forward kernel compiled in" in first.stdout
    assert "relu / hard_sigmoid: forward kernel loaded from the cache in" in second.stdout
    assert f"Cached in {tmp_path}" in second.stdout


def test_compile_rejects_an_unknown_activation():
    result = subprocess.run([sys.executable, "-m", "fusedlstm", "compile", "--activation", "gelu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("python -m fusedlstm compile: error:")
    assert "invalid choice: 'gelu'" in result.stderr
