"""`python -m fusedlstm`: checks this machine and reports.

Prints the environment, verifies that `fusedlstm.LSTM` matches
`keras.layers.LSTM` (weights byte for byte, outputs and gradients within
tolerance, masked and unmasked) and times both layers at a few shapes.
"""

import dataclasses
import importlib
import json
import os
import statistics
import time

import keras
import numba
import numpy as np

import fusedlstm
from fusedlstm import ops as fused_ops
from fusedlstm.cli import CliError, format_shape

PARITY_SHAPE = (4, 12, 8, 16)
SEED = 1
OUTPUT_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4
WARMUP_CALLS = 2


@dataclasses.dataclass
class ParityCheck:
    """One comparison of the fused layer against the stock layer.

    Attributes:
        name: what was compared.
        passed: whether it is within tolerance (or byte-identical).
        max_abs_diff: the largest absolute difference, `None` for the
            byte-identity check.
        tolerance: the largest difference allowed, `None` for the
            byte-identity check.
    """

    name: str
    passed: bool
    max_abs_diff: float | None = None
    tolerance: float | None = None


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


def run_check(shapes, runs, json_path=None, png_path=None, device="auto"):
    """Reports the environment, parity and timings; returns the exit code.

    Args:
        shapes: `(N, T, C, H)` tuples to time.
        runs: timed calls per layer, mode and shape (the median is reported).
        json_path: where to write the results as JSON, or `None`.
        png_path: where to draw the timings, or `None`.
        device: `"auto"`, `"cpu"` or `"gpu"`.

    Returns:
        0 when parity holds, 1 when it fails.
    """
    if png_path:
        require_module("matplotlib", "--png")
    on_gpu = resolve_device(device)
    environment = describe_environment(on_gpu)
    print(format_environment(environment))
    problem = fused_backend_problem()
    if problem:
        raise CliError(problem)
    with device_scope(on_gpu), _progress_bar() as progress:
        task = progress.add_task("parity with keras.layers.LSTM", total=1 + len(shapes))
        checks = check_parity()
        passed = all(check.passed for check in checks)
        print(f"\n{format_parity(checks)}\n")
        timings = []
        for shape in shapes if passed else ():
            progress.update(task, advance=1, description=f"timing N,T,C,H = {format_shape(shape)}")
            timings.append(time_shape(shape, runs))
    if passed:
        print(format_timings(timings, runs, environment["device"]))
    else:
        print("Parity FAILED: timings skipped.")
    if json_path:
        write_json(json_path, environment, checks, timings, runs)
        print(f"\nWrote {json_path}")
    if png_path and timings:
        plot_timings(png_path, timings, environment["device"])
        print(f"Wrote {png_path}")
    return 0 if passed else 1


def require_module(name, needed_for):
    """Raises a `CliError` naming the `cli` extra when `name` is not installed."""
    try:
        __import__(name)
    except ImportError:
        raise CliError(
            f"{needed_for} needs {name}: pip install 'fusedlstm[cli]'") from None


def resolve_device(requested):
    """Whether to run on the GPU for `--device auto|cpu|gpu`."""
    gpu = gpu_name()
    if requested == "gpu" and gpu is None:
        raise CliError(
            f"--device gpu: no GPU is visible to the {keras.backend.backend()} backend "
            "on this machine")
    return gpu is not None and requested != "cpu"


def device_scope(on_gpu):
    """A `keras.device` scope on the first GPU or on the CPU."""
    # Not "cpu:0": under it, Keras's torch backend fails to build layers.
    return keras.device("gpu:0" if on_gpu else "cpu")


def gpu_name():
    """The name of the first GPU the Keras backend sees, or `None`."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return None
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if backend == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        return gpus[0].device_kind if gpus else None
    return None


def framework_version():
    """The version of the framework behind the Keras backend (`tensorflow`, `torch`, ...)."""
    return importlib.import_module(keras.backend.backend()).__version__


def kernel_in_use(on_gpu):
    """Which Numba kernel module the fused layer runs, and why.

    Asks `fusedlstm.kernels.select` where it exists; without it the CPU
    `njit` kernels are the only ones.
    """
    choice = os.environ.get("FUSEDLSTM_KERNEL", "auto")
    try:
        from fusedlstm.kernels.select import select_kernels
    except ModuleNotFoundError as error:
        if error.name != "fusedlstm.kernels.select":
            raise
        return "fusedlstm.kernels.cpu (njit; no kernel selection in this install)"
    try:
        kernels = select_kernels(on_gpu)
    except (ValueError, RuntimeError, ImportError) as error:
        raise CliError(f"FUSEDLSTM_KERNEL={choice}: {error}") from None
    return f"{getattr(kernels, '__name__', kernels)} (FUSEDLSTM_KERNEL={choice})"


def fused_backend_problem():
    """Why the fused layer cannot run on this Keras backend, or `None`."""
    backend = keras.backend.backend()
    if backend in fused_ops.SUPPORTED_BACKENDS:
        return None
    return (f"the fused op does not support the Keras backend {backend!r} yet "
            f"(supported: {', '.join(fused_ops.SUPPORTED_BACKENDS)})")


def describe_environment(on_gpu):
    """The environment report as an ordered dict of label to value."""
    gpu = gpu_name()
    if on_gpu:
        device = f"GPU: {gpu}"
    else:
        device = "CPU" if gpu is None else f"CPU (GPU {gpu} not used: --device cpu)"
    problem = fused_backend_problem()
    return {
        "fusedlstm": fusedlstm.__version__,
        "keras_backend": keras.backend.backend(),
        "keras": keras.__version__,
        keras.backend.backend(): framework_version(),
        "numba": numba.__version__,
        "device": device,
        "kernel": kernel_in_use(on_gpu),
        "fused_path": problem or "available",
    }


def format_environment(environment):
    width = max(len(key) for key in environment) + 2
    lines = ["Environment"]
    for key, value in environment.items():
        lines.append(f"  {key.replace('_', ' '):<{width}}{value}")
    return "\n".join(lines)


def check_parity():
    """Compares `fusedlstm.LSTM` with `keras.layers.LSTM` on this machine.

    Both layers are built after the same `keras.utils.set_random_seed` and
    must hold byte-identical weights. Then, with the stock weights copied
    into the fused layer, outputs (sequence, h and c) and gradients (inputs
    and weights) of a fixed random projection of the outputs must agree,
    without a mask and with one that has right padding, left padding and a
    hole.

    Returns:
        A list of `ParityCheck`.
    """
    N, T, C, H = PARITY_SHAPE
    layers = []
    for layer_class in (keras.layers.LSTM, fusedlstm.LSTM):
        keras.utils.set_random_seed(SEED)
        layer = layer_class(H, return_sequences=True, return_state=True)
        layer.build((N, T, C))
        layers.append(layer)
    stock, fused = layers
    checks = [ParityCheck(
        f"get_weights() byte-identical after keras.utils.set_random_seed({SEED})",
        _same_bytes(stock.get_weights(), fused.get_weights()))]
    fused.set_weights(stock.get_weights())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, T, C)).astype("float32")
    mask = np.ones((N, T), bool)
    mask[1, T // 2:] = False
    mask[2, :3] = False
    mask[3, T // 3] = False
    for label, case_mask in (("", None), (", masked", mask)):
        stock_out, stock_grads = outputs_and_grads(stock, x, case_mask)
        fused_out, fused_grads = outputs_and_grads(fused, x, case_mask)
        checks.append(_within("outputs" + label, stock_out, fused_out, OUTPUT_TOLERANCE))
        checks.append(_within("gradients" + label, list(stock_grads.values()),
                              list(fused_grads.values()), GRADIENT_TOLERANCE))
    return checks


def _same_bytes(arrays, others):
    return len(arrays) == len(others) and all(
        a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        for a, b in zip(arrays, others))


def _within(name, expected, actual, tolerance):
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(expected, actual))
    return ParityCheck(name, diff <= tolerance, diff, tolerance)


def outputs_and_grads(layer, x, mask=None, initial_state=None, training=False, seed=1):
    """Calls `layer` and differentiates a fixed random projection of all outputs.

    Args:
        layer: a Keras layer; x: [N, T, C] NumPy inputs; mask: [N, T] bool or
            None; initial_state: `[h0, c0]` NumPy arrays or None.
        seed: seeds the projection, one standard normal float32 array per
            output, drawn in order.

    Returns:
        `(outputs, grads)` as NumPy arrays: `outputs` lists what the layer
        returned; `grads` is a dict with `x`, `h0` and `c0` (when initial
        states are given) and one entry per trainable weight name.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        run = _outputs_and_grads_tensorflow
    elif backend == "torch":
        run = _outputs_and_grads_torch
    elif backend == "jax":
        run = _outputs_and_grads_jax
    else:
        raise CliError(f"no gradient check for the Keras backend {backend!r}")
    outputs, grads = run(layer, x, mask, initial_state, training, seed)
    names = ["x"] + (["h0", "c0"] if initial_state is not None else [])
    names += [w.name for w in layer.trainable_weights]
    return _to_numpy(outputs), {
        name: np.zeros(1, "float32") if g is None else _to_numpy([g])[0]
        for name, g in zip(names, grads)
    }


def _probe_loss(outputs, seed):
    rng = np.random.default_rng(seed)
    loss = 0.0
    for y in outputs:
        probe = keras.ops.convert_to_tensor(rng.standard_normal(tuple(y.shape)).astype("float32"))
        loss = loss + keras.ops.sum(keras.ops.cast(y, "float32") * probe)
    return loss


def _as_list(outputs):
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _outputs_and_grads_tensorflow(layer, x, mask, initial_state, training, seed):
    import tensorflow as tf

    x = tf.constant(x)
    states = [] if initial_state is None else [tf.constant(s) for s in initial_state]
    with tf.GradientTape() as tape:
        for source in [x] + states:
            tape.watch(source)
        outputs = _as_list(layer(x, mask=None if mask is None else tf.constant(mask),
                                 initial_state=states or None, training=training))
        loss = _probe_loss(outputs, seed)
    return outputs, tape.gradient(loss, [x] + states + layer.trainable_weights)


def _outputs_and_grads_torch(layer, x, mask, initial_state, training, seed):
    import torch

    x = torch.tensor(x, requires_grad=True)
    states = [] if initial_state is None else [
        torch.tensor(s, requires_grad=True) for s in initial_state]
    outputs = _as_list(layer(x, mask=None if mask is None else torch.tensor(mask),
                             initial_state=states or None, training=training))
    sources = [x] + states + [w.value for w in layer.trainable_weights]
    grads = torch.autograd.grad(_probe_loss(outputs, seed), sources, allow_unused=True)
    return [y.detach() for y in outputs], grads


def _outputs_and_grads_jax(layer, x, mask, initial_state, training, seed):
    import jax

    if not layer.built:
        layer.build(x.shape)
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(sources):
        x, states, weights = sources
        outputs, updated = layer.stateless_call(
            weights, non_trainable, x, mask=mask, initial_state=states or None,
            training=training)
        outputs = _as_list(outputs)
        return _probe_loss(outputs, seed), (outputs, updated)

    states = [] if initial_state is None else list(initial_state)
    sources = (x, states, [v.value for v in layer.trainable_variables])
    (d_x, d_states, d_weights), (outputs, updated) = jax.grad(loss, has_aux=True)(sources)
    # Stateful states and the dropout seed advance as in an eager call.
    for variable, value in zip(layer.non_trainable_variables, updated):
        variable.assign(value)
    return outputs, [d_x, *d_states, *d_weights]


def _to_numpy(tensors):
    return [np.asarray(keras.ops.convert_to_numpy(t)) for t in tensors]


def time_shape(shape, runs):
    """Median seconds of both layers' forward pass and training step at `shape`.

    The forward pass runs with `training=False`; the training step is the
    forward pass with `training=True` plus the gradients of the summed
    output with respect to the weights. On TensorFlow both run inside a
    `tf.function`. The first `WARMUP_CALLS` calls (tracing, JIT compile) are
    not timed.
    """
    N, T, C, H = shape
    x = keras.ops.convert_to_tensor(
        np.random.default_rng(0).standard_normal((N, T, C)).astype("float32"))
    seconds = {}
    for name, layer_class in (("keras", keras.layers.LSTM), ("fused", fusedlstm.LSTM)):
        keras.utils.set_random_seed(SEED)
        layer = layer_class(H)
        forward, train_step = _step_functions(layer, x)
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

    import torch

    def forward():
        with torch.no_grad():
            return layer(x, training=False)

    def train_step():
        loss = keras.ops.sum(layer(x, training=True))
        return torch.autograd.grad(loss, [w.value for w in layer.trainable_weights])

    return forward, train_step


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


def _progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description:<40}"), BarColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not console.is_terminal)


def format_parity(checks):
    N, T, C, H = PARITY_SHAPE
    lines = [f"Parity with keras.layers.LSTM (N={N}, T={T}, C={C}, H={H})"]
    for check in checks:
        status = "PASS" if check.passed else "FAIL"
        line = f"  {status}  {check.name}"
        if check.tolerance is not None:
            line = f"{line:<30} max |diff| {check.max_abs_diff:.1e} (tolerance {check.tolerance:.0e})"
        lines.append(line)
    return "\n".join(lines)


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


def write_json(path, environment, checks, timings, runs):
    """Writes the environment, parity checks and timings to `path`."""
    N, T, C, H = PARITY_SHAPE
    result = {
        "environment": environment,
        "parity": {
            "passed": all(check.passed for check in checks),
            "shape": {"N": N, "T": T, "C": C, "H": H},
            "checks": [dataclasses.asdict(check) for check in checks],
        },
        "timings": {"runs": runs, "results": [timing.as_dict() for timing in timings]},
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


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
