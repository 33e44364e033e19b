"""Export on JAX: `tf_saved_model` serves without fusedlstm; `openvino` says what works.

Keras exports a JAX model through jax2tf with a symbolic batch dimension; the
fused layers see it (or a jax2tf / jax.export / keras.src.export frame) and
trace the stock loop (`lax.scan`), which jax2tf serializes. The SavedModel is
served in a fresh process (`python -I`, every import of fusedlstm refused).
"""

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip("needs KERAS_BACKEND=jax", allow_module_level=True)

from export_helpers import (  # noqa: E402
    PYFUNC_OPS, assert_serves, describe, fitted_model, require, sample, saved_model_ops,
    serve_fresh)

require("tensorflow")

import fusedlstm  # noqa: E402
from fusedlstm import convert  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return fitted_model(fusedlstm.LSTM)


def test_tf_saved_model_serves_without_fusedlstm(model, tmp_path):
    path = str(tmp_path / "sm")
    convert.export(model, path, verbose=False)
    ops = saved_model_ops(path)
    describe("tf_saved_model", [op for op in ops if "Xla" in op or "Py" in op])
    assert not PYFUNC_OPS & set(ops)
    x, x5 = sample(3), sample(5, seed=2)
    served = serve_fresh({"b3": {"kind": "saved_model", "path": path, "x": x},
                          "b5": {"kind": "saved_model", "path": path, "x": x5}}, tmp_path)
    assert served["_modules"] == []
    assert_serves(served, "b3", np.asarray(model.predict(x, verbose=0)))
    assert_serves(served, "b5", np.asarray(model.predict(x5, verbose=0)))


def test_openvino_raises_at_export_time_naming_what_works(model, tmp_path):
    require("openvino")
    path = tmp_path / "m.xml"
    # OpenVINO's converter traces the model and re-raises our ValueError in its own
    # exception, with the message kept.
    with pytest.raises(Exception, match="Export from the TensorFlow or PyTorch backend"):
        model.export(str(path), format="openvino", verbose=False)
    assert not path.exists()


def test_model_runs_fused_after_export(model, fused_calls):
    model(sample(3))
    assert len(fused_calls) == 2
