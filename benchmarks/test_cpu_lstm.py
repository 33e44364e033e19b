"""CPU speed: fusedlstm.LSTM against keras.layers.LSTM, torch.nn.LSTM and ONNX Runtime's
LSTM operator.

Run one implementation per process: `--framework fusedlstm|keras` times that Keras
layer on the backend `KERAS_BACKEND` names (tensorflow: inside `tf.function`; torch:
eagerly; jax: `test_jax_lstm.py`), `--framework torch` times `torch.nn.LSTM` and
`--framework onnxruntime` one ONNX `LSTM` node (inference only). `run_cpu.py` runs them
all and writes the comparison. Groups are `shape/mode/case`, so each table puts the
implementations side by side; `extra_info["implementation"]` names the process's one.
"""

import pytest

import cases
from fusedlstm.kernels.cpu.threads import usable_cpus

# ONNX Runtime runs on as many threads as the fused kernels do by default.
THREADS = usable_cpus()


def keras_backend():
    import keras

    return keras.backend.backend()


def implementation(framework):
    """The name of what this process times: `backend/layer` for the Keras layers."""
    if framework == "torch":
        return "torch.nn.LSTM"
    if framework == "onnxruntime":
        return "onnxruntime"
    return f"{keras_backend()}/{framework}"


def make_run(framework, shape, mode, case):
    """The timed callable of `framework` at `shape`, or None where it has no such row."""
    if framework == "torch":
        return cases.make_torch(cases.SHAPES[shape], mode, case)
    if framework == "onnxruntime":
        return cases.make_onnxruntime(cases.SHAPES[shape], mode, case, THREADS)
    import keras

    import fusedlstm

    if framework == "fusedlstm":
        cases.load_fused_kernels()
    layer_class = fusedlstm.LSTM if framework == "fusedlstm" else keras.layers.LSTM
    backend = keras_backend()
    if backend == "torch":
        return None if case != "plain" else cases.make_keras_torch(
            layer_class, cases.SHAPES[shape], mode, case)
    return cases.make_keras_tensorflow(layer_class, cases.SHAPES[shape], mode, case)


def threads_used(framework):
    """The threads the timed implementation runs on, as it reports them."""
    if framework == "torch":
        import torch

        return {"torch_intra_op": torch.get_num_threads()}
    if framework == "onnxruntime":
        return {"onnxruntime_intra_op": THREADS}
    threads = {}
    if framework == "fusedlstm":
        from fusedlstm.kernels.cpu.threads import thread_count

        threads["fusedlstm_kernels"] = thread_count()
    if keras_backend() == "torch":
        import torch

        threads["torch_intra_op"] = torch.get_num_threads()
    return threads


def time_case(benchmark, framework, shape, mode, case, run):
    benchmark.group = f"{shape}/{mode}/{case}"
    benchmark.name = implementation(framework)
    benchmark.extra_info.update(
        implementation=implementation(framework), framework=framework, shape=shape, mode=mode,
        case=case, NTCH=cases.SHAPES[shape], flops=cases.layer_flops(cases.SHAPES[shape], mode),
        threads=threads_used(framework))
    benchmark.pedantic(run, rounds=cases.ROUNDS, warmup_rounds=cases.WARMUP_ROUNDS,
                       iterations=1)


@pytest.fixture
def framework_here(framework):
    """The `--framework` of this process, skipping where `test_jax_lstm.py` times it."""
    if framework in ("fusedlstm", "keras") and keras_backend() == "jax":
        pytest.skip("the JAX backend is timed by test_jax_lstm.py")
    return framework


@pytest.mark.parametrize("shape,mode,case", cases.ROWS)
def test_lstm_speed(benchmark, framework_here, shape, mode, case):
    run = make_run(framework_here, shape, mode, case)
    if run is None:
        pytest.skip(f"{implementation(framework_here)} has no {shape} {mode} {case} row")
    time_case(benchmark, framework_here, shape, mode, case, run)


@pytest.mark.parametrize("mode", cases.MODES)
def test_lstm_speed_one_core_busy(benchmark, framework_here, busy_core, mode):
    """S2 with another process spinning on one core for the whole measurement
    (TensorFlow backend and torch.nn.LSTM)."""
    if framework_here == "onnxruntime" or (framework_here != "torch"
                                           and keras_backend() != "tensorflow"):
        pytest.skip("the busy-core rows are timed for TensorFlow and torch.nn.LSTM")
    time_case(benchmark, framework_here, "S2", mode, "busy_core",
              make_run(framework_here, "S2", mode, "plain"))
