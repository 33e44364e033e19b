"""Per-call overhead of the fused op outside the CPU drivers, on the active Keras backend.

    KERAS_BACKEND=tensorflow python benchmarks/op_overhead.py   # also torch, jax

On a tiny problem (N=1, T=1, C=4, H=4) the drivers' own time is a few
microseconds; what the op adds around them (framework dispatch, the
callback, wrapping arrays, allocating results) is the rest. Printed per
direction, in microseconds, medians of `REPEATS` rounds of `CALLS` calls:
the op's time per call minus the drivers' time per call on the same NumPy
arrays (`kernels.cpu.forward`/`backward` called directly). Inside
`tf.function` / `jax.jit`, `K` chained op calls are traced into one function
and the function's time with K calls minus its time with none, over K, is
the op's marginal cost (the function call itself excluded). Compilation is
never timed: every path runs before it is measured.
"""

import os
import statistics
import time

os.environ.setdefault("FUSEDLSTM_COMPILE", "foreground")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from fusedlstm import ops  # noqa: E402
from fusedlstm.kernels import cpu  # noqa: E402
from fusedlstm.kernels.gates import SIGMOID, TANH  # noqa: E402

N, T, C, H = 1, 1, 4, 4
CALLS, REPEATS, K = 200, 15, 20
CONFIG = ops.RecurrenceConfig(TANH, SIGMOID, False, training=True)


def arrays():
    rng = np.random.default_rng(0)
    shapes = [(N, T, C), (C, 4 * H), (4 * H,), (H, 4 * H), (N, H), (N, H)]
    return [rng.standard_normal(s).astype(np.float32) * 0.3 for s in shapes]


def per_call_us(function, calls=CALLS):
    """Median over rounds of the time per call of `function()`, in microseconds."""
    function()
    rounds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


def driver_times(x, kernel, bias, recurrent_kernel, h0, c0):
    """`(forward, forward + backward)` of the drivers alone, in microseconds."""
    def forward(training):
        return cpu.forward(x, kernel, bias, recurrent_kernel, h0, c0, None, None, None, TANH,
                           SIGMOID, False, training)

    outputs, h_n, c_n, saved = forward(True)

    def both():
        outputs, h_n, c_n, saved = forward(True)
        cpu.backward(x, kernel, recurrent_kernel, None, None, None, TANH, SIGMOID, False,
                     saved, outputs, h_n, c_n)

    return per_call_us(lambda: forward(False)), per_call_us(both)


def tensorflow_times(inputs):
    import tensorflow as tf

    from fusedlstm.backends import tensorflow as backend

    inference = ops.RecurrenceConfig(TANH, SIGMOID, False, training=False)
    tensors = [tf.constant(a) for a in inputs]
    variables = [tf.Variable(a) for a in inputs[1:4]]

    def forward(config=inference):
        return backend.lstm_sequence(*tensors, None, None, None, config)

    def train_step():
        with tf.GradientTape() as tape:
            weights = [tf.identity(v) for v in variables]
            outputs, h_n, c_n = backend.lstm_sequence(tensors[0], *weights, *tensors[4:], None,
                                                      None, None, CONFIG)
            loss = tf.reduce_sum(outputs)
        return tape.gradient(loss, variables)

    def chained(k, training):
        @tf.function
        def run(x, h, c):
            weights = [tf.identity(v) for v in variables]
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.zeros(())
                for _ in range(k):
                    _, h, c = backend.lstm_sequence(x, *weights, h, c, None, None, None,
                                                    CONFIG if training else inference)
                    loss += tf.reduce_sum(h)
            if training:
                return tape.gradient(loss, [x] + weights)
            return h
        return lambda: run(tensors[0], tensors[4], tensors[5])

    return {"eager forward": per_call_us(forward), "eager forward+backward": per_call_us(
        train_step), **_chained(chained)}


def _chained(chained):
    results = {}
    for training, name in ((False, "forward"), (True, "forward+backward")):
        with_k = per_call_us(chained(K, training), calls=CALLS // 10)
        without = per_call_us(chained(0, training), calls=CALLS // 10)
        results[f"compiled {name}"] = (with_k - without) / K
    return results


def torch_times(inputs):
    import torch

    from fusedlstm.backends import torch as backend

    inference = ops.RecurrenceConfig(TANH, SIGMOID, False, training=False)
    tensors = [torch.from_numpy(a) for a in inputs]
    weights = [t.clone().requires_grad_() for t in tensors[1:4]]

    def forward():
        with torch.no_grad():
            return backend.lstm_sequence(*tensors, None, None, None, inference)

    def train_step():
        outputs, _, _ = backend.lstm_sequence(tensors[0], *weights, *tensors[4:], None, None,
                                              None, CONFIG)
        outputs.sum().backward()

    return {"eager forward": per_call_us(forward),
            "eager forward+backward": per_call_us(train_step)}


def jax_times(inputs):
    import jax
    import jax.numpy as jnp

    from fusedlstm.backends import jax as backend

    arrays_ = [jnp.asarray(a) for a in inputs]

    def chained(k, training):
        def loss(weights, x, h, c):
            total = jnp.zeros(())
            for _ in range(k):
                _, h, c = backend.lstm_sequence(x, *weights, h, c, None, None, None, CONFIG)
                total += jnp.sum(h)
            return total

        run = jax.jit(jax.grad(loss) if training else loss)
        return lambda: jax.block_until_ready(run(arrays_[1:4], arrays_[0], *arrays_[4:]))

    return _chained(chained)


def main():
    inputs = arrays()
    driver_forward, driver_both = driver_times(*inputs)
    backend = keras.backend.backend()
    times = {"tensorflow": tensorflow_times, "torch": torch_times, "jax": jax_times}[backend](
        inputs)
    print(f"backend={backend} N={N} T={T} C={C} H={H}: drivers {driver_forward:.1f} us "
          f"forward, {driver_both:.1f} us forward+backward")
    for name, value in times.items():
        driver = driver_both if "backward" in name else driver_forward
        print(f"  {name}: {value:.1f} us per call, {value - driver:.1f} us outside the drivers")


if __name__ == "__main__":
    main()
