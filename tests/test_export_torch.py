"""Export on PyTorch: ONNX, OpenVINO and `torch.export` serve without fusedlstm.

While torch traces the model for export (`torch.onnx.is_in_onnx_export`,
`torch.jit.is_tracing`, `torch.compiler.is_exporting`) the fused layers run
`aten::lstm`: one ONNX `LSTM` node per layer. One fresh process (`python -I`,
every import of fusedlstm refused) serves all the artifacts.
"""

import keras
import pytest

if keras.backend.backend() != "torch":
    pytest.skip("needs KERAS_BACKEND=torch", allow_module_level=True)

from export_helpers import (  # noqa: E402
    assert_serves, describe, fitted_model, onnx_ops, require, sample, serve_fresh)

require("onnx", "onnxruntime", "openvino")

import fusedlstm  # noqa: E402
from fusedlstm import convert  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_torch")
    model = fitted_model(fusedlstm.LSTM)
    x, x5 = sample(3), sample(5, seed=2)
    paths = {"onnx": str(tmp / "m.onnx"), "openvino": str(tmp / "m.xml"),
             "torch": str(tmp / "m.pt2")}
    model.export(paths["onnx"], format="onnx", verbose=False)
    convert.export(model, paths["openvino"], format="openvino", verbose=False)
    model.export(paths["torch"], format="torch", verbose=False)
    jobs = {
        "onnx": {"kind": "onnx", "path": paths["onnx"], "x": x},
        "onnx_batch5": {"kind": "onnx", "path": paths["onnx"], "x": x5},
        "openvino": {"kind": "openvino", "path": paths["openvino"], "x": x5},
        "onnx_to_openvino": {"kind": "onnx_to_openvino", "path": paths["onnx"], "x": x},
        # Keras fixes the batch of a torch.export program at 1 without a signature.
        "torch": {"kind": "torch_export", "path": paths["torch"], "x": x[:1]},
    }
    served = serve_fresh(jobs, tmp)
    expected = {name: keras.ops.convert_to_numpy(model.predict(job["x"], verbose=0))
                for name, job in jobs.items()}
    return paths, served, expected, model


def test_the_serving_process_loaded_no_fusedlstm(exported):
    assert exported[1]["_modules"] == []


def test_onnx_has_native_lstm_nodes(exported):
    paths, served, expected, _ = exported
    ops = onnx_ops(paths["onnx"])
    describe("onnx", ops)
    assert "LSTM" in ops and "Loop" not in ops
    for name in ("onnx", "onnx_batch5"):
        assert_serves(served, name, expected[name])


def test_openvino_direct_and_through_onnx(exported):
    _, served, expected, _ = exported
    for name in ("openvino", "onnx_to_openvino"):
        assert_serves(served, name, expected[name])


def test_torch_export_program_holds_aten_lstm(exported):
    _, served, expected, _ = exported
    describe("torch", served["torch"].get("classes"))
    assert "aten.lstm.input" in served["torch"]["classes"]
    assert_serves(served, "torch", expected["torch"])


def test_model_runs_fused_after_export(exported, fused_calls):
    """Exporting changes nothing outside the export traces (one call per layer)."""
    exported[3](sample(3))
    assert len(fused_calls) == 2
