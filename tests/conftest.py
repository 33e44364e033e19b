import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The tests test the compiled kernels: no NumPy stand-in while they compile
# (tests/test_background_compile.py tests that, in processes of its own).
os.environ.setdefault("FUSEDLSTM_COMPILE", "foreground")

import pytest  # noqa: E402

import fusedlstm.ops  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Modules that set `BACKEND_INDEPENDENT = True` test no Keras backend (the
    kernels, alone or in the CUDA simulator): CI's TensorFlow pass runs them, the
    PyTorch and JAX passes skip them instead of running them twice more."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
        return
    if os.environ.get("FUSEDLSTM_BACKEND_INDEPENDENT_TESTS") == "1":
        return  # benchmarks/gpu_run.py: the GPU image has no TensorFlow
    skip = pytest.mark.skip(reason="backend-independent: runs in the TensorFlow pass")
    for item in items:
        if getattr(item.module, "BACKEND_INDEPENDENT", False):
            item.add_marker(skip)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls (traces, under jit) that reach the fused op."""
    calls = []
    original = fusedlstm.ops.lstm_sequence

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fusedlstm.ops, "lstm_sequence", counting)
    return calls
