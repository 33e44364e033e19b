"""CPU speed: fusedlstm.LSTM against keras.layers.LSTM and torch.nn.LSTM.

Run one framework per process (`--framework`); `run_cpu.py` runs all three
and writes the comparison. Groups are `shape/mode/case`, so each table puts the
frameworks side by side.
"""

import pytest

import cases


def versions(framework):
    if framework == "torch":
        import torch

        return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    import keras
    import tensorflow as tf

    return {"keras": keras.__version__, "tensorflow": tf.__version__}


def make_run(framework, shape, mode, case):
    """The timed callable of `framework` at `shape`, or None where it has no `case`."""
    if framework == "torch":
        return cases.make_torch(cases.SHAPES[shape], mode, case)
    import keras

    import fusedlstm

    layer_class = fusedlstm.LSTM if framework == "fusedlstm" else keras.layers.LSTM
    return cases.make_keras(layer_class, cases.SHAPES[shape], mode, case)


def time_case(benchmark, framework, shape, mode, case, run):
    benchmark.group = f"{shape}/{mode}/{case}"
    benchmark.name = framework
    benchmark.extra_info.update(
        framework=framework, shape=shape, mode=mode, case=case,
        NTCH=cases.SHAPES[shape], **versions(framework))
    benchmark.pedantic(run, rounds=7, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("case", cases.CASES)
@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("shape", sorted(cases.SHAPES))
def test_lstm_speed(benchmark, framework, shape, mode, case):
    run = make_run(framework, shape, mode, case)
    if run is None:
        pytest.skip(f"{framework} has no {case} case")
    time_case(benchmark, framework, shape, mode, case, run)


@pytest.mark.parametrize("mode", cases.MODES)
def test_lstm_speed_one_core_busy(benchmark, framework, busy_core, mode):
    """S2 with another process spinning on one core for the whole measurement."""
    time_case(benchmark, framework, "S2", mode, "busy_core",
              make_run(framework, "S2", mode, "plain"))
