"""GPU checks and timings of the layer: `fusedlstm.LSTM(use_fused=True)` against
`keras.layers.LSTM`, on the Keras torch backend.

Needs an NVIDIA GPU, PyTorch with CUDA and cuDNN, numba-cuda, Keras (torch
backend; no TensorFlow) and this package installed. From the repository root:

    KERAS_BACKEND=torch python benchmarks/gpu/layer.py --out benchmarks/results/

(or `python benchmarks/gpu/checks.py layer ...`).

1. Checks: the same weights; outputs, final states and the gradients of
   the inputs, initial states and weights, with masks (left-padded,
   holes) and dropout; the stock layer runs cuDNN where Keras lets it and
   its step loop elsewhere; TF32 off; a float64 stock layer is the
   reference.
2. Training: the same small model trained a few epochs with each layer.
3. Timings: forward and a training step at N in {1, 16, 64, 256}, T = 100,
   C = H in {256, 512, 1024}: no mask (stock on cuDNN), a left-padded mask
   and recurrent dropout 0.25 (stock on its step loop); PyTorch's default
   TF32 settings; medians of synchronized wall times.

Writes `<out>/gpu_layer.json` (rewritten after each part) and everything it
prints to `<out>/gpu_layer.txt`.
"""

import importlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import (GRAD_TOL, OUTPUT_TOL, ROOT, environment, median_ms, now,  # noqa: E402
                     save_json, say, set_tf32, start_log)

TIMED_STEPS = 100
TIMED_BATCHES = (1, 16, 64, 256)
TIMED_UNITS = (256, 512, 1024)
TIMED_CASES = {
    "no_mask": {},
    "left_padded": {"mask": "left"},
    "recurrent_dropout": {"recurrent_dropout": 0.25},
}
# (N, T, C, H) for the checks: a cuDNN-sized problem and an awkward small one.
CHECK_SIZES = ((16, 100, 256, 256), (3, 7, 5, 31))
CHECK_CASES = {
    "no_mask": ({"return_state": True}, {"initial_state": True}),
    "go_backwards": ({"go_backwards": True}, {}),
    "left_padded": ({"return_state": True}, {"mask": "left", "initial_state": True}),
    "holes": ({}, {"mask": "holes"}),
    "recurrent_dropout": ({"dropout": 0.2, "recurrent_dropout": 0.3, "return_state": True},
                          {"training": True}),
    "recurrent_dropout_left_padded": ({"recurrent_dropout": 0.3},
                                      {"mask": "left", "training": True}),
}
TRAIN_EPOCHS = 5
TRAIN_CASES = {"no_mask": {}, "recurrent_dropout": {"recurrent_dropout": 0.25}}
LOSS_RTOL = 1e-3


def add_arguments(parser):
    """The options of the `layer` subcommand, beside `harness.add_common_arguments`."""
    parser.add_argument("--batches", type=int, nargs="+", default=TIMED_BATCHES,
                        help="layer: batch sizes N to time (default: %(default)s)")
    parser.add_argument("--units", type=int, nargs="+", default=TIMED_UNITS,
                        help="layer: sizes C = H to time (default: %(default)s)")
    parser.add_argument("--skip-training", action="store_true",
                        help="layer: skip the training runs")


def run(args):
    """The `layer` subcommand: checks, training and timings, as `args` says."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    stack = import_stack()
    start_log(args.out / "gpu_layer.txt")
    path = args.out / "gpu_layer.json"
    report = {"environment": layer_environment(stack), "started": now()}
    save_json(report, path)
    if not args.skip_checks:
        report["checks"] = run_layer_checks(stack)
        save_json(report, path)
    if not args.skip_training:
        report["training"] = run_layer_training(stack)
        save_json(report, path)
    if not args.skip_timings:
        report["timings"] = run_layer_timings(stack, args.batches, args.units, args.warmup,
                                              args.repeats or 20, args.out, report)
    save_json(report, path)
    say(format_layer_report(report))


def main(argv=None):
    return harness.run_command(__doc__.splitlines()[0], add_arguments, run, argv)


# ---------------------------------------------------------------------------
# layer: the imported stack.


def layer_environment(stack):
    torch = stack.torch
    info = environment(torch)
    info.update({
        "keras": stack.keras.__version__,
        "keras_backend": stack.keras.backend.backend(),
        "fusedlstm": stack.fusedlstm.__version__,
        "fusedlstm_kernel_env": os.environ.get("FUSEDLSTM_KERNEL", "auto"),
        "tf32_default": {"cudnn": torch.backends.cudnn.allow_tf32,
                         "matmul": torch.backends.cuda.matmul.allow_tf32},
    })
    return info


class Stack:
    """The imported modules, and a count of the stock layer's cuDNN calls."""

    def __init__(self, torch, keras, fusedlstm, cuda_kernels):
        self.torch = torch
        self.keras = keras
        self.fusedlstm = fusedlstm
        self.cuda_kernels = cuda_kernels
        self.cudnn_calls = 0


def import_stack():
    """Imports torch, Keras and fusedlstm; checks the backend, GPU and kernels."""
    import keras
    import torch

    if keras.backend.backend() != "torch":
        sys.exit(f"Run with KERAS_BACKEND=torch; the backend is {keras.backend.backend()!r}.")
    if harness.on_gpu() and not torch.cuda.is_available():
        sys.exit("No CUDA device visible to PyTorch.")
    try:
        import fusedlstm
        from fusedlstm.kernels.select import select_kernels
    except ImportError as error:
        sys.exit(f"{error}. Install the package first: pip install --no-deps -e {ROOT}")
    # On the CPU (a dry run) only FUSEDLSTM_KERNEL=cuda runs the CUDA kernels,
    # in the simulator.
    cuda_kernels = select_kernels(data_on_gpu=harness.on_gpu())
    if cuda_kernels.__name__ != "fusedlstm.kernels.cuda":
        sys.exit(f"The fused layer would run {cuda_kernels.__name__} on "
                 f"{harness.DEVICE} data; check FUSEDLSTM_KERNEL and that numba-cuda sees "
                 "the GPU.")
    stack = Stack(torch, keras, fusedlstm, cuda_kernels)
    _count_cudnn_calls(stack)
    return stack


def _count_cudnn_calls(stack):
    """Counts the stock layer's cuDNN calls (Keras falls back silently otherwise)."""
    rnn = importlib.import_module("keras.src.backend.torch.rnn")
    cudnn_lstm = rnn._cudnn_lstm

    def counted(*args, **kwargs):
        result = cudnn_lstm(*args, **kwargs)
        stack.cudnn_calls += 1
        return result

    rnn._cudnn_lstm = counted


def make_pair(stack, units, features, seed=0, **kwargs):
    """A stock and a fused layer with the same weights and dropout seed."""
    keras = stack.keras
    keras.utils.set_random_seed(seed)
    stock = keras.layers.LSTM(units, seed=seed, **kwargs)
    fused = stack.fusedlstm.LSTM(units, seed=seed, use_fused=True, **kwargs)
    for layer in (stock, fused):
        layer.build((None, None, features))
    fused.set_weights(stock.get_weights())
    return stock, fused


def make_reference(stack, stock, features, **kwargs):
    """The stock layer in float64, with the same weights."""
    reference = stack.keras.layers.LSTM(stock.units, dtype="float64", **kwargs)
    reference.build((None, None, features))
    reference.set_weights([w.astype("float64") for w in stock.get_weights()])
    return reference


def make_mask(kind, batch, steps, rng):
    """A [N, T] bool mask: left-padded, or with holes and one fully masked row."""
    import numpy as np

    if kind == "left":
        lengths = rng.integers(1, steps + 1, size=batch)
        lengths[0] = steps
        return np.arange(steps)[None, :] >= (steps - lengths)[:, None]
    mask = rng.random((batch, steps)) > 0.3
    mask[-1] = False
    return mask


def outputs_and_grads(stack, layer, x, mask, states, training, dtype):
    """Outputs and gradients (inputs, states, weights) of a fixed probe loss, as float64."""
    import numpy as np

    torch = stack.torch
    device = torch.device(harness.DEVICE)
    xs = torch.tensor(x, dtype=dtype, device=device, requires_grad=True)
    hs = [torch.tensor(s, dtype=dtype, device=device, requires_grad=True) for s in states or []]
    mask = None if mask is None else torch.tensor(mask, device=device)
    ys = layer(xs, mask=mask, initial_state=hs or None, training=training)
    ys = list(ys) if isinstance(ys, (list, tuple)) else [ys]
    rng = np.random.default_rng(0)
    loss = sum((y * torch.tensor(rng.standard_normal(tuple(y.shape)), dtype=y.dtype,
                                 device=device)).sum() for y in ys)
    for w in layer.trainable_weights:
        w.value.grad = None
    loss.backward()
    sources = [xs] + hs + [w.value for w in layer.trainable_weights]
    names = ["x"] + ["h0", "c0"][:len(hs)] + [w.name for w in layer.trainable_weights]
    return ([_float64(y) for y in ys],
            {name: _float64(s.grad) for name, s in zip(names, sources)})


def _float64(tensor):
    return tensor.detach().double().cpu().numpy()


# ---------------------------------------------------------------------------
# layer: checks and training.


def run_layer_checks(stack, sizes=CHECK_SIZES, cases=CHECK_CASES, on_row=None):
    """`check_layer_case` for every size (N, T, C, H) and case; a list of rows.

    `on_row(rows)`, when given, is called after each case (to save progress).
    """
    import numpy as np

    set_tf32(False)
    rows = []
    try:
        for size in sizes:
            for case, (kwargs, options) in cases.items():
                new_rows = check_layer_case(stack, case, size, kwargs, options,
                                            np.random.default_rng(len(rows)))
                for row in new_rows:
                    say(format_check(row))
                rows.extend(new_rows)
                if on_row is not None:
                    on_row(rows)
    finally:
        set_tf32(True)
    return rows


def check_layer_case(stack, case, size, kwargs, options, rng):
    """One row per output and gradient: errors of fused and stock against float64."""
    import numpy as np

    N, T, C, H = size
    kwargs = {"return_sequences": True, **kwargs}
    stock, fused = make_pair(stack, H, C, **kwargs)
    x = rng.standard_normal((N, T, C)).astype("float32")
    mask = make_mask(options["mask"], N, T, rng) if "mask" in options else None
    states = None
    if options.get("initial_state"):
        states = [rng.standard_normal((N, H)).astype("float32") for _ in range(2)]
    training = options.get("training", False)
    calls = stack.cudnn_calls
    stock_out, stock_grads = outputs_and_grads(stack, stock, x, mask, states, training,
                                               stack.torch.float32)
    stock_path = "cudnn" if stack.cudnn_calls > calls else "loop"
    fused_out, fused_grads = outputs_and_grads(stack, fused, x, mask, states, training,
                                               stack.torch.float32)
    reference = None
    if not training:  # dropout masks are drawn per dtype: no float64 twin
        ref_layer = make_reference(stack, stock, C, **kwargs)
        reference = outputs_and_grads(stack, ref_layer, x, mask, states, training,
                                      stack.torch.float64)
    quantities = [(f"output{k}", f, s) for k, (f, s) in enumerate(zip(fused_out, stock_out))]
    quantities += [(f"grad_{name}", fused_grads[name], stock_grads[name])
                   for name in stock_grads]
    ref_values = {}
    if reference is not None:
        ref_values = {f"output{k}": r for k, r in enumerate(reference[0])}
        ref_values.update({f"grad_{name}": r for name, r in reference[1].items()})
    rows = []
    for name, fused_value, stock_value in quantities:
        tol = OUTPUT_TOL if name.startswith("output") else GRAD_TOL
        row = {"case": case, "N": N, "T": T, "C": C, "H": H, "quantity": name,
               "stock_path": stock_path,
               "fused_vs_stock": float(np.abs(fused_value - stock_value).max()),
               "tolerance": tol}
        if name in ref_values:
            ref = ref_values[name]
            row["fused_vs_float64"] = float(np.abs(fused_value - ref).max())
            row["stock_vs_float64"] = float(np.abs(stock_value - ref).max())
        row["passed"] = row["fused_vs_stock"] <= tol or (
            "fused_vs_float64" in row
            and row["fused_vs_float64"] <= 2 * row["stock_vs_float64"] + 1e-6)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# 2. Training.


def run_layer_training(stack, samples=512, steps=50, features=32, units=64):
    import numpy as np

    keras = stack.keras
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, steps, features)).astype("float32")
    y = np.tanh(x[:, -10:, :4].sum(axis=(1, 2)))[:, None].astype("float32")
    set_tf32(False)
    results = {}
    try:
        for case, kwargs in TRAIN_CASES.items():
            losses = {}
            for name in ("stock", "fused"):
                stock, fused = make_pair(stack, units, features, seed=1, **kwargs)
                model = keras.Sequential([keras.Input((steps, features)),
                                          stock if name == "stock" else fused,
                                          keras.layers.Dense(1)])
                keras.utils.set_random_seed(2)
                model.layers[-1].set_weights([np.full((units, 1), 0.05, "float32"),
                                              np.zeros(1, "float32")])
                model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
                start = time.perf_counter()
                history = model.fit(x, y, batch_size=32, epochs=TRAIN_EPOCHS, shuffle=False,
                                    verbose=0)
                losses[name] = history.history["loss"]
                losses[f"{name}_seconds"] = time.perf_counter() - start
            relative = [abs(f - s) / abs(s) for f, s in zip(losses["fused"], losses["stock"])]
            results[case] = {**losses, "max_relative_difference": max(relative),
                             "passed": max(relative) <= LOSS_RTOL}
            say(format_training(case, results[case]))
    finally:
        set_tf32(True)
    return results


# ---------------------------------------------------------------------------
# layer: timings.


def run_layer_timings(stack, batches, units_list, warmup, repeats, out_dir, report):
    rows = []
    report["timings"] = rows
    for H in units_list:
        for case, options in TIMED_CASES.items():
            for N in batches:
                for mode in ("forward", "train"):
                    rows.append(time_one(stack, case, options, mode, N, H, warmup, repeats))
                    say(format_timing(rows[-1]))
            save_json(report, out_dir / "gpu_layer.json")
    return rows


def time_one(stack, case, options, mode, N, H, warmup, repeats, steps=TIMED_STEPS,
             torch_lstm=False):
    """Median times of the stock and the fused layer (and with `torch_lstm`, of
    `torch.nn.LSTM`: cuDNN on a GPU) for one case, mode ("forward" or "train"),
    N, C = H and `steps`, the device synchronized around each run."""
    import numpy as np

    torch = stack.torch
    rng = np.random.default_rng(N * H)
    kwargs = {k: v for k, v in options.items() if k != "mask"}
    stock, fused = make_pair(stack, H, H, return_sequences=True, **kwargs)
    x = torch.tensor(rng.standard_normal((N, steps, H)), dtype=torch.float32,
                     device=harness.DEVICE)
    mask = None
    if "mask" in options:
        mask = torch.tensor(make_mask(options["mask"], N, steps, rng), device=harness.DEVICE)
    probe = torch.randn((N, steps, H), device=harness.DEVICE)
    calls = stack.cudnn_calls
    timings = {"stock": median_ms(torch, _step(torch, stock, x, mask, probe, mode),
                                  warmup, repeats)}
    stock_path = "cudnn" if stack.cudnn_calls > calls else "loop"
    timings["fused"] = median_ms(torch, _step(torch, fused, x, mask, probe, mode),
                                 warmup, repeats)
    if torch_lstm:
        timings["torch"] = median_ms(torch, _torch_lstm_step(N, H, steps, mode), warmup,
                                     repeats)
    speedup = timings["stock"][0] / timings["fused"][0]
    target = layer_target_speedup(case, mode, N)
    row = {"case": case, "mode": mode, "N": N, "T": steps, "C": H, "H": H,
           "stock_path": stock_path,
           "stock_ms": timings["stock"][0], "fused_ms": timings["fused"][0],
           "speedup": speedup, "target_speedup": target,
           "target_met": None if target is None else speedup >= target,
           "raw_ms": {name: timing[1] for name, timing in timings.items()}}
    if torch_lstm:
        row["torch_lstm_ms"] = timings["torch"][0]
    return row


def _torch_lstm_step(N, H, steps, mode):
    """A `torch.nn.LSTM` forward (no grad) or training step at C = H (`kernels.py`'s)."""
    import kernels as kernel_checks

    problem = kernel_checks.make_problem(N, H, steps)
    lstm = kernel_checks.cudnn_lstm(problem)
    if mode == "forward":
        return lambda: kernel_checks.cudnn_forward(lstm, problem)
    return lambda: kernel_checks.cudnn_train_step(lstm, problem)


def _step(torch, layer, x, mask, probe, mode):
    """A forward call without grad, or a forward and backward pass."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                layer(x, mask=mask, training=False)
        return run

    def run():
        for w in layer.trainable_weights:
            w.value.grad = None
        layer(x, mask=mask, training=True).backward(probe)
    return run


def layer_target_speedup(case, mode, N):
    """The speedup the project aims for, or None where it sets none."""
    if N == 256:
        return 1.0
    if N <= 16 and case == "no_mask" and mode == "forward":
        return 3.0
    if N <= 16 and case in ("left_padded", "recurrent_dropout"):
        return 5.0
    return None


# ---------------------------------------------------------------------------
# layer: output.


def format_check(row):
    status = "ok" if row["passed"] else "FAILED"
    ref = ""
    if "fused_vs_float64" in row:
        ref = (f" | vs float64: fused {row['fused_vs_float64']:.2e}"
               f" stock {row['stock_vs_float64']:.2e}")
    return (f"check {row['case']:30s} N={row['N']:<3d} T={row['T']:<3d} C={row['C']:<3d} "
            f"H={row['H']:<3d} ({row['stock_path']}) {row['quantity']:22s} "
            f"fused-stock {row['fused_vs_stock']:.2e} (tol {row['tolerance']:.0e}){ref} "
            f"{status}")


def format_training(case, result):
    curves = " ".join(f"{s:.5f}/{f:.5f}" for s, f in zip(result["stock"], result["fused"]))
    return (f"train {case:18s} loss stock/fused per epoch: {curves} | max rel diff "
            f"{result['max_relative_difference']:.2e} | {result['stock_seconds']:.1f} s / "
            f"{result['fused_seconds']:.1f} s | {'ok' if result['passed'] else 'FAILED'}")


def format_timing(row):
    target = "-" if row["target_speedup"] is None else f"{row['target_speedup']:.0f}x"
    met = {None: "-", True: "yes", False: "NO"}[row["target_met"]]
    return (f"{row['mode']:7s} {row['case']:18s} N={row['N']:<4d} H={row['H']:<5d} "
            f"stock ({row['stock_path']}) {row['stock_ms']:9.3f} ms  fused "
            f"{row['fused_ms']:9.3f} ms  x{row['speedup']:6.2f}  target {target:>3s} met {met}")


def format_layer_report(report):
    env = report["environment"]
    lines = [f"GPU: {env['gpu']} ({env['nvidia_smi']})",
             f"torch {env['torch']} (CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}) "
             f"keras {env['keras']} numba {env['numba']} numba-cuda {env['numba-cuda']} "
             f"fusedlstm {env['fusedlstm']}"]
    if "checks" in report:
        failed = [row for row in report["checks"] if not row["passed"]]
        lines.append(f"checks: {len(report['checks']) - len(failed)} passed, "
                     f"{len(failed)} failed")
        lines.extend(f"  {format_check(row)}" for row in failed)
    if "training" in report:
        lines.extend(format_training(case, result)
                     for case, result in report["training"].items())
    if "timings" in report:
        lines.extend(format_timing(row) for row in report["timings"])
        with_target = [row for row in report["timings"] if row["target_met"] is not None]
        missed = [row for row in with_target if not row["target_met"]]
        lines.append(f"targets: {len(with_target) - len(missed)} of {len(with_target)} met")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    sys.exit(main())
