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


@pytest.mark.parametrize("case", cases.CASES)
@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("shape", sorted(cases.SHAPES))
def test_lstm_speed(benchmark, framework, shape, mode, case):
    if framework == "torch":
        run = cases.make_torch(cases.SHAPES[shape], mode, case)
    else:
        import keras

        import fusedlstm

        layer_class = fusedlstm.LSTM if framework == "fusedlstm" else keras.layers.LSTM
        run = cases.make_keras(layer_class, cases.SHAPES[shape], mode, case)
    if run is None:
        pytest.skip(f"{framework} has no {case} case")
    benchmark.group = f"{shape}/{mode}/{case}"
    benchmark.name = framework
    benchmark.extra_info.update(
        framework=framework, shape=shape, mode=mode, case=case,
        NTCH=cases.SHAPES[shape], gemm_floor_ms=cases.gemm_floor_ms(cases.SHAPES[shape], mode),
        **versions(framework))
    benchmark.pedantic(run, rounds=7, warmup_rounds=2, iterations=1)
