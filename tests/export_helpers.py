"""Export tests' shared parts: the model, fresh serving processes without fusedlstm,
and the op lists of artifacts."""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

TOLERANCE = 1e-5
STEPS, FEATURES = 20, 8
PYFUNC_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


def sample(batch=3, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, STEPS, FEATURES)).astype("float32")


def fitted_model(lstm):
    """Input(20, 8) -> lstm(16, return_sequences) -> lstm(16) -> Dense(1), one epoch."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((STEPS, FEATURES)),
        lstm(16, return_sequences=True),
        lstm(16),
        keras.layers.Dense(1),
    ])
    model.compile("adam", "mse")
    x = sample(8, seed=1)
    model.fit(x, x[:, -1, :1], epochs=1, batch_size=4, verbose=0)
    return model


def require(*modules):
    """Skips the calling module when one of `modules` is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: pip install 'fusedlstm[export]'",
                    allow_module_level=True)


# Runs in `python -I` (no PYTHONPATH, no current directory, no user site), with
# every import of fusedlstm refused (an editable or a regular install alike).
_PRELUDE = r"""
import importlib.abc, json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

class _NoFusedlstm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fusedlstm" or name.startswith("fusedlstm."):
            raise ImportError("fusedlstm is hidden from this process")
        return None

sys.meta_path.insert(0, _NoFusedlstm())
try:
    import fusedlstm
    raise SystemExit("fusedlstm imported in the fresh process")
except ImportError:
    pass
import numpy as np

def _run(job):
    kind, path, x = job["kind"], job["path"], np.load(job["x"])
    if kind == "saved_model":
        import tensorflow as tf
        loaded = tf.saved_model.load(path)
        y = loaded.signatures["serving_default"](tf.constant(x)) if job.get("signature") \
            else loaded.serve(tf.constant(x))
        y = list(y.values())[0] if isinstance(y, dict) else y
        return y.numpy()
    if kind == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    if kind == "tflite":
        import tensorflow as tf
        interpreter = tf.lite.Interpreter(model_path=path)
        detail = interpreter.get_input_details()[0]
        if list(detail["shape"]) != list(x.shape):
            interpreter.resize_tensor_input(detail["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    if kind in ("openvino", "onnx_to_openvino"):
        import openvino as ov
        core = ov.Core()
        model = ov.convert_model(path) if kind == "onnx_to_openvino" else path
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return compiled(x)[0]
    if kind == "torch_export":
        import torch
        program = torch.export.load(path)
        job["classes"] = sorted({str(n.target) for n in program.graph.nodes
                                 if n.op == "call_function"})
        return program.module()(torch.from_numpy(x)).detach().numpy()
    if kind == "keras":
        import keras
        model = keras.saving.load_model(path)
        job["classes"] = sorted({type(l).__module__ + "." + type(l).__name__ for l in model.layers})
        return keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    raise ValueError(kind)

results = {}
for name, job in json.loads(sys.argv[1]).items():
    try:
        y = _run(job)
        results[name] = {"y": np.asarray(y).tolist(), "classes": job.get("classes")}
    except Exception as error:
        results[name] = {"error": f"{type(error).__name__}: {error}"[-2000:]}
results["_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("fusedlstm", "numba"))
print("RESULTS " + json.dumps(results))
"""


def serve_fresh(jobs, tmp_path, keras_backend=None):
    """Serves artifacts in one fresh process where fusedlstm cannot be imported.

    Args:
        jobs: {name: {"kind": "saved_model" | "onnx" | "tflite" | "openvino" |
            "onnx_to_openvino" | "torch_export" | "keras", "path": ..., "x": array}}.
        keras_backend: KERAS_BACKEND of the process (for "keras" jobs).

    Returns:
        {name: {"y": array, "classes": the layer classes of a "keras" job,
        the ops of a "torch_export" job} or {"error": message}}, and "_modules": the
        fusedlstm and numba modules the process loaded.
    """
    payload = {}
    for name, job in jobs.items():
        x_path = str(tmp_path / f"{name}-x.npy")
        np.save(x_path, job["x"])
        payload[name] = dict(job, x=x_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if keras_backend:
        env["KERAS_BACKEND"] = keras_backend
    result = subprocess.run([sys.executable, "-I", "-c", _PRELUDE, json.dumps(payload)],
                            capture_output=True, text=True, env=env, cwd=str(tmp_path),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    served = json.loads(line[len("RESULTS "):])
    for value in served.values():
        if isinstance(value, dict) and "y" in value:
            value["y"] = np.asarray(value["y"], np.float32)
    return served


def assert_serves(served, name, expected):
    result = served[name]
    assert "error" not in result, result["error"]
    np.testing.assert_allclose(result["y"], expected, rtol=0, atol=TOLERANCE)


def saved_model_ops(path):
    """Every op type in a SavedModel's graph and function library."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    ops = set()
    for graph in proto.meta_graphs:
        ops |= {node.op for node in graph.graph_def.node}
        for function in graph.graph_def.library.function:
            ops |= {node.op for node in function.node_def}
    return sorted(ops)


def onnx_ops(path):
    """Every op type in an ONNX model, subgraphs included."""
    import onnx

    def walk(graph):
        for node in graph.node:
            yield node.op_type
            for attribute in node.attribute:
                if attribute.g.node:
                    yield from walk(attribute.g)

    return sorted(set(walk(onnx.load(path).graph)))


def tflite_ops(path):
    """Every op of a `.tflite` file (builtin names; Flex ops start with "Flex")."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=path)
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


def describe(name, ops):
    """Prints an artifact's op list (shown with `pytest -s`, kept in CI logs on failure)."""
    print(f"{name} ops: {json.dumps(ops)}")
