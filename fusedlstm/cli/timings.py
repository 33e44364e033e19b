"""The timings of `python -m fusedlstm check`: both layers, forward and training step."""

import dataclasses
import statistics
import time

import keras
import numpy as np

import fusedlstm

SEED = 1
WARMUP_CALLS = 2


@dataclasses.dataclass
class Timing:
    """Median seconds of both layers at one shape `(N, T, C, H)`."""

    shape: tuple
    forward_keras: float
    forward_fused: float
    train_keras: float
    train_fused: float

    def as_dict(self):
        N, T, C, H = self.shape
        row = {"N": N, "T": T, "C": C, "H": H}
        for mode in ("forward", "train"):
            keras_s, fused_s = getattr(self, f"{mode}_keras"), getattr(self, f"{mode}_fused")
            row[f"{mode}_keras_ms"] = keras_s * 1e3
            row[f"{mode}_fused_ms"] = fused_s * 1e3
            row[f"{mode}_speedup"] = keras_s / fused_s
        return row


def time_shape(shape, runs):
    """Median seconds of both layers' forward pass and training step at `shape`.

    The forward pass runs with `training=False`; the training step is the
    forward pass with `training=True` plus the gradients of the summed
    output with respect to the weights. On TensorFlow both run inside a
    `tf.function`. The first `WARMUP_CALLS` calls (tracing, JIT compile) are
    not timed, and the fused layer is timed on its compiled CPU kernels, not
    on the NumPy stand-in that runs while they compile (`kernels.cpu`).
    """
    from fusedlstm.kernels import cpu
    from fusedlstm.kernels.gates import SIGMOID, TANH

    N, T, C, H = shape
    x = keras.ops.convert_to_tensor(
        np.random.default_rng(0).standard_normal((N, T, C)).astype("float32"))
    seconds = {}
    for name, layer_class in (("keras", keras.layers.LSTM), ("fused", fusedlstm.LSTM)):
        keras.utils.set_random_seed(SEED)
        layer = layer_class(H)
        forward, train_step = _step_functions(layer, x)
        if name == "fused":
            cpu.wait_for_kernels(TANH, SIGMOID)
        seconds[f"forward_{name}"] = _median_seconds(forward, runs)
        seconds[f"train_{name}"] = _median_seconds(train_step, runs)
    return Timing(shape=tuple(shape), **seconds)


def _step_functions(layer, x):
    """`(forward, train_step)` callables for the active backend."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        @tf.function
        def forward():
            return layer(x, training=False)

        @tf.function
        def train_step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x, training=True))
            return tape.gradient(loss, layer.trainable_weights)

        return forward, train_step

    if keras.backend.backend() == "jax":
        return _jax_step_functions(layer, x)

    import torch

    def forward():
        with torch.no_grad():
            return layer(x, training=False)

    def train_step():
        loss = keras.ops.sum(layer(x, training=True))
        return torch.autograd.grad(loss, [w.value for w in layer.trainable_weights])

    return forward, train_step


def _jax_step_functions(layer, x):
    """Jitted forward and gradient steps through `stateless_call`, as Keras's JAX trainer runs them."""
    import jax

    layer.build(x.shape)
    weights = [w.value for w in layer.trainable_variables]
    others = [w.value for w in layer.non_trainable_variables]

    def call(weights, training):
        return layer.stateless_call(weights, others, x, training=training)[0]

    forward = jax.jit(lambda weights: call(weights, False))
    train_step = jax.jit(jax.grad(lambda weights: keras.ops.sum(call(weights, True))))
    return lambda: forward(weights), lambda: train_step(weights)


def _median_seconds(fn, runs):
    for _ in range(WARMUP_CALLS):
        _wait(fn())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        _wait(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _wait(result):
    # Copying a result to the host waits for asynchronous (GPU) work to end.
    keras.ops.convert_to_numpy(keras.tree.flatten(result)[0])


def format_shape(shape):
    """`(1, 100, 32, 128)` as `"1,100,32,128"`, the way `--shapes` takes it."""
    return ",".join(str(n) for n in shape)


def format_timings(timings, runs, device):
    header = (
        f"Timings on {device}: milliseconds, median of {runs} runs "
        "(JIT compile and warm-up excluded)\n"
        f"{'':21}{'forward (training=False)':<31}training step (forward + backward)\n"
        f"{'N':>4}{'T':>5}{'C':>5}{'H':>6}  "
        + f"{'keras':>9}{'fused':>9}{'speed-up':>10}   " * 2)
    rows = []
    for timing in timings:
        row = timing.as_dict()
        cells = [f"{row[k]:>{w}}" for k, w in (("N", 4), ("T", 5), ("C", 5), ("H", 6))]
        for mode in ("forward", "train"):
            cells.append(
                f"  {row[f'{mode}_keras_ms']:>9.2f}{row[f'{mode}_fused_ms']:>9.2f}"
                f"{row[f'{mode}_speedup']:>9.2f}x ")
        rows.append("".join(cells).rstrip())
    note = "speed-up = keras time / fused time: above 1 means fusedlstm.LSTM is faster."
    return "\n".join([header.rstrip()] + rows + [note])


def plot_timings(path, timings, device):
    """Draws forward and training-step times of both layers per shape to `path`."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    axes = figure.subplots(1, 2)
    positions = np.arange(len(timings))
    width = 0.38
    for ax, (mode, title) in zip(axes, (("forward", "forward (training=False)"),
                                        ("train", "training step (forward + backward)"))):
        rows = [timing.as_dict() for timing in timings]
        stock = [row[f"{mode}_keras_ms"] for row in rows]
        fused = [row[f"{mode}_fused_ms"] for row in rows]
        ax.bar(positions - width / 2, stock, width, label="keras.layers.LSTM")
        bars = ax.bar(positions + width / 2, fused, width, label="fusedlstm.LSTM")
        ax.bar_label(bars, [f"{row[f'{mode}_speedup']:.2g}x" for row in rows], padding=2)
        ax.set_xticks(positions, [f"N,T,C,H =\n{format_shape(t.shape)}" for t in timings])
        ax.set_yscale("log")
        ax.set_ylabel("milliseconds (log scale)")
        ax.set_title(title)
        ax.legend()
    figure.suptitle(f"fusedlstm vs keras.layers.LSTM on {device}")
    figure.savefig(path, dpi=100)
