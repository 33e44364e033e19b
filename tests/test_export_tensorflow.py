"""Export on TensorFlow: every format serves in a process without fusedlstm.

One fitted model (Input(20, 8) -> LSTM(16, return_sequences) -> LSTM(16) ->
Dense(1)) is exported once per format; one fresh process (`python -I`, every
import of fusedlstm refused) serves all the artifacts; each test checks one
artifact's ops and its outputs against the Keras model at 1e-5.
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "tensorflow":
    pytest.skip("needs KERAS_BACKEND=tensorflow", allow_module_level=True)

from export_helpers import (  # noqa: E402
    PYFUNC_OPS, assert_serves, describe, fitted_model, onnx_ops, require, sample,
    saved_model_ops, serve_fresh, tflite_ops)

require("onnx", "onnxruntime", "tf2onnx", "openvino")

import tensorflow as tf  # noqa: E402

import fusedlstm  # noqa: E402
from fusedlstm import convert  # noqa: E402

BATCH = 3
FIXED_BATCH = [tf.TensorSpec((BATCH, 20, 8), tf.float32)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, {name: path}, served results) for every TF export route."""
    tmp = tmp_path_factory.mktemp("export_tf")
    model = fitted_model(fusedlstm.LSTM)
    x, x5 = sample(BATCH), sample(5, seed=2)
    paths = {name: str(tmp / file) for name, file in {
        "saved_model": "sm", "tf_saved_model_save": "tfsave", "export_archive": "archive",
        "onnx": "m.onnx", "convert_onnx": "c.onnx", "litert_dynamic": "dynamic.tflite",
        "litert_fixed": "fixed.tflite", "openvino": "m.xml", "portable": "portable.keras",
    }.items()}
    model.export(paths["saved_model"], verbose=False)
    tf.saved_model.save(model, paths["tf_saved_model_save"])
    # An endpoint traced (fused) before export: TF retraces it while saving.
    endpoint = tf.function(lambda x: model(x, training=False))
    endpoint(x)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", endpoint)
    archive.write_out(paths["export_archive"], verbose=False)
    model.export(paths["onnx"], format="onnx", verbose=False)
    convert.export(model, paths["convert_onnx"], format="onnx", verbose=False)
    model.export(paths["litert_dynamic"], format="litert", verbose=False)
    convert.export(model, paths["litert_fixed"], format="litert", verbose=False,
                   input_signature=FIXED_BATCH)
    convert.export(model, paths["openvino"], format="openvino", verbose=False)
    convert.save_portable(model, paths["portable"])
    jobs = {
        "saved_model": {"kind": "saved_model", "path": paths["saved_model"], "x": x},
        "saved_model_batch5": {"kind": "saved_model", "path": paths["saved_model"], "x": x5},
        "tf_saved_model_save": {"kind": "saved_model", "path": paths["tf_saved_model_save"],
                                "x": x, "signature": True},
        "export_archive": {"kind": "saved_model", "path": paths["export_archive"], "x": x},
        "onnx": {"kind": "onnx", "path": paths["onnx"], "x": x},
        "convert_onnx": {"kind": "onnx", "path": paths["convert_onnx"], "x": x5},
        "litert_dynamic": {"kind": "tflite", "path": paths["litert_dynamic"], "x": x},
        "litert_dynamic_batch5": {"kind": "tflite", "path": paths["litert_dynamic"], "x": x5},
        "litert_fixed": {"kind": "tflite", "path": paths["litert_fixed"], "x": x},
        "openvino": {"kind": "openvino", "path": paths["openvino"], "x": x},
        "onnx_to_openvino": {"kind": "onnx_to_openvino", "path": paths["onnx"], "x": x5},
        "portable": {"kind": "keras", "path": paths["portable"], "x": x},
    }
    served = serve_fresh(jobs, tmp, keras_backend="tensorflow")
    expected = {name: np.asarray(model.predict(job["x"], verbose=0))
                for name, job in jobs.items()}
    return model, paths, served, expected


def check(exported, *names):
    _, _, served, expected = exported
    for name in names:
        assert_serves(served, name, expected[name])


def test_the_serving_process_loaded_no_fusedlstm(exported):
    assert exported[2]["_modules"] == []


@pytest.mark.parametrize("name", ["saved_model", "tf_saved_model_save", "export_archive"])
def test_saved_model_holds_no_python_callback(exported, name):
    ops = saved_model_ops(exported[1][name])
    describe(name, [op for op in ops if "While" in op or "Py" in op])
    assert not PYFUNC_OPS & set(ops)
    check(exported, name)
    if name == "saved_model":
        check(exported, "saved_model_batch5")


@pytest.mark.parametrize("name", ["onnx", "convert_onnx"])
def test_onnx_has_native_lstm_nodes(exported, name):
    ops = onnx_ops(exported[1][name])
    describe(name, ops)
    assert "LSTM" in ops
    assert not {op for op in ops if op.startswith("PyFunc")}
    check(exported, name)


def test_litert_fixed_batch_uses_the_builtin_lstm(exported):
    ops = tflite_ops(exported[1]["litert_fixed"])
    describe("litert_fixed", ops)
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" in ops
    assert not [op for op in ops if op.startswith("Flex")]
    check(exported, "litert_fixed")


def test_litert_dynamic_batch_needs_no_flex_delegate(exported):
    ops = tflite_ops(exported[1]["litert_dynamic"])
    describe("litert_dynamic", ops)
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"]
    check(exported, "litert_dynamic", "litert_dynamic_batch5")


def test_openvino_direct_and_through_onnx(exported):
    check(exported, "openvino", "onnx_to_openvino")


def test_portable_keras_file_loads_as_stock_layers(exported):
    model, paths, served, expected = exported
    assert served["portable"]["classes"] == [
        "keras.src.layers.core.dense.Dense", "keras.src.layers.rnn.lstm.LSTM"]
    check(exported, "portable")
    back = convert.to_fused(keras.saving.load_model(paths["portable"]))
    assert [type(layer) for layer in back.layers[:2]] == [fusedlstm.LSTM] * 2
    assert all(a.tobytes() == b.tobytes()
               for a, b in zip(back.get_weights(), model.get_weights()))
    x = sample(BATCH)
    np.testing.assert_array_equal(back.predict(x, verbose=0), model.predict(x, verbose=0))


def test_model_runs_fused_after_export(exported, fused_calls):
    """Exporting changes nothing outside the export traces: eager calls and a
    user's `tf.function` still reach the fused op (one call per layer)."""
    model = exported[0]
    x = sample(BATCH)
    model(x)
    assert len(fused_calls) == 2
    tf.function(lambda x: model(x, training=False))(x)
    assert len(fused_calls) == 4


def test_mask_and_go_backwards_in_onnx_litert_and_openvino(tmp_path):
    """A mask exports the stock loop: ONNX `Loop`; unrolled for LiteRT (no Flex
    ops at a dynamic batch) and OpenVINO. go_backwards keeps the native LSTM."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((20, 8))
    masked = fusedlstm.LSTM(6)(keras.layers.Masking(0.0)(inputs))
    backwards = fusedlstm.LSTM(5, go_backwards=True)(inputs)
    model = keras.Model(inputs, keras.layers.Concatenate()([masked, backwards]))
    x = sample(BATCH)
    x[0, 14:] = 0.0
    paths = {"onnx": str(tmp_path / "options.onnx"), "tflite": str(tmp_path / "options.tflite"),
             "openvino": str(tmp_path / "options.xml")}
    convert.export(model, paths["onnx"], format="onnx", verbose=False)  # calls it first
    model.export(paths["tflite"], format="litert", verbose=False)
    model.export(paths["openvino"], format="openvino", verbose=False)
    ops = onnx_ops(paths["onnx"])
    describe("options onnx", ops)
    assert {"LSTM", "Loop", "ReverseSequence"} <= set(ops)
    ops = tflite_ops(paths["tflite"])
    describe("options litert", ops)
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"]
    served = serve_fresh({kind: {"kind": kind, "path": path, "x": x}
                          for kind, path in paths.items()}, tmp_path)
    expected = np.asarray(model(x))
    for kind in paths:
        assert_serves(served, kind, expected)
