"""Streaming latency: one timestep per call, the state carried between calls.

N = 1, C = 32, H = 128, T = 1: a stateful Keras layer called inside a
`tf.function` (TensorFlow backend), and `torch.nn.LSTM` called eagerly with
its `(h, c)` passed back in. fusedlstm is timed twice: `use_fused="auto"`
(a static single step runs as one call of the cell) and `use_fused=True`
(the fused kernel). Run one framework per process (`--framework`);
`run_streaming.py` runs all three and writes the comparison.

    KERAS_BACKEND=tensorflow pytest benchmarks/test_streaming.py --framework=fusedlstm
"""

import numpy as np
import pytest

import cases

N, C, H = 1, 32, 128
CHECKED_STEPS = 5
VARIANTS = {"fusedlstm": ("auto", "kernel"), "keras": ("stock",), "torch": ("eager",)}


def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, CHECKED_STEPS, C)).astype("float32")
    weights = [rng.normal(0, 1 / np.sqrt(C), (C, 4 * H)).astype("float32"),
               rng.normal(0, 1 / np.sqrt(H), (H, 4 * H)).astype("float32"),
               rng.normal(0, 0.1, 4 * H).astype("float32")]
    return x, weights


def make_keras(layer_class, **kwargs):
    """`step()`: one call of a stateful layer in a `tf.function`, outputs checked first."""
    import keras
    import tensorflow as tf

    x, weights = problem()
    layer = layer_class(H, stateful=True, return_sequences=True, **kwargs)
    model = keras.Sequential([keras.Input(batch_shape=(N, 1, C)), layer])
    layer.set_weights(weights)
    call = tf.function(lambda x: model(x, training=False))
    steps = [tf.constant(x[:, t:t + 1]) for t in range(CHECKED_STEPS)]
    outputs = np.concatenate([call(s).numpy() for s in steps], axis=1)
    cases.check_against_reference(outputs, x, None, weights)
    layer.reset_states()
    return lambda: call(steps[0])


def make_torch():
    """`step()`: one eager `torch.nn.LSTM` call with the state passed back in."""
    import torch

    x, (kernel, recurrent_kernel, bias) = problem()
    lstm = torch.nn.LSTM(C, H, batch_first=True)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(kernel.T))
        lstm.weight_hh_l0.copy_(torch.from_numpy(recurrent_kernel.T))
        lstm.bias_ih_l0.copy_(torch.from_numpy(bias))
        lstm.bias_hh_l0.zero_()
    steps = [torch.from_numpy(x[:, t:t + 1]) for t in range(CHECKED_STEPS)]
    state = [None]

    def step(x_t):
        with torch.inference_mode():
            y, state[0] = lstm(x_t, state[0])
        return y

    outputs = np.concatenate([step(s).numpy() for s in steps], axis=1)
    cases.check_against_reference(outputs, x, None, [kernel, recurrent_kernel, bias])
    state[0] = None
    return lambda: step(steps[0])


def versions(framework):
    if framework == "torch":
        import torch

        return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    import keras
    import tensorflow as tf

    return {"keras": keras.__version__, "tensorflow": tf.__version__}


@pytest.mark.parametrize("variant", sorted({v for vs in VARIANTS.values() for v in vs}))
def test_streaming_step_latency(benchmark, framework, variant):
    if variant not in VARIANTS[framework]:
        pytest.skip(f"{framework} has no {variant} variant")
    if framework == "torch":
        step = make_torch()
    else:
        import keras

        if keras.backend.backend() != "tensorflow":
            pytest.skip("times the layer inside a tf.function: KERAS_BACKEND=tensorflow")
        import fusedlstm

        if framework == "keras":
            step = make_keras(keras.layers.LSTM)
        else:
            step = make_keras(fusedlstm.LSTM, use_fused="auto" if variant == "auto" else True)
    benchmark.group = f"streaming/N{N}-C{C}-H{H}"
    benchmark.name = f"{framework}-{variant}"
    benchmark.extra_info.update(framework=framework, variant=variant, NCH=(N, C, H),
                                **versions(framework))
    benchmark.pedantic(step, rounds=20 if cases.QUICK else 500,
                       warmup_rounds=5 if cases.QUICK else 50, iterations=1)
