"""`fusedlstm.LSTM` against `keras.layers.LSTM` on a GPU, Keras torch backend.

Needs an NVIDIA GPU, PyTorch with CUDA and cuDNN, numba-cuda, Keras and this
package installed (no TensorFlow). From the repository root:

    pip install --no-deps -e .
    KERAS_BACKEND=torch python benchmarks/gpu_layer.py --out benchmarks/results/

It does, in order:

1. Checks: both layers hold the same weights; outputs, final states and the
   gradients of the inputs, initial states and weights, with masks
   (left-padded, holes) and dropout. The stock layer runs cuDNN where Keras
   lets it (no mask, no recurrent dropout) and its step loop elsewhere. TF32
   is off; a float64 stock layer is the reference.
2. Training: the same small model trained a few epochs with each layer, loss
   curves side by side (TF32 off).
3. Timings: forward (`training=False`, no grad) and a training step
   (forward and backward) of each layer at N in {1, 16, 64, 256}, T = 100,
   C = H in {256, 512, 1024}: no mask (the stock layer on cuDNN), a
   left-padded mask and recurrent dropout 0.25 (the stock layer on its step
   loop). PyTorch's default TF32 settings; `torch.cuda.synchronize()` before
   each clock read; warm-up and JIT excluded; medians.

Targets (speedup = stock median / fused median): at least 3x in the forward
pass without a mask at N <= 16; at least 5x with a left-padded mask or
recurrent dropout at N <= 16 (forward and training step); at least 1x
everywhere at N = 256.

Everything (GPU name, versions, errors, loss curves, raw timings) goes to
`<out>/gpu_layer.json`, rewritten after each part, and a summary to
`<out>/gpu_layer.txt`.
"""

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

from gpu_environment import gpu_environment

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEVICE = "cuda"

TIMED_BATCHES = (1, 16, 64, 256)
TIMED_UNITS = (256, 512, 1024)
TIMED_STEPS = 100
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
OUTPUT_TOL = 1e-5
GRAD_TOL = 1e-4
TRAIN_EPOCHS = 5
TRAIN_CASES = {"no_mask": {}, "recurrent_dropout": {"recurrent_dropout": 0.25}}
LOSS_RTOL = 1e-3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Check, train and time fusedlstm.LSTM against keras.layers.LSTM "
                    "(cuDNN) on a GPU with the Keras torch backend.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for gpu_layer.json and gpu_layer.txt "
                             "(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed runs per measurement; the median is reported "
                             "(default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed runs first (default: %(default)s)")
    parser.add_argument("--batches", type=int, nargs="+", default=TIMED_BATCHES,
                        help="batch sizes N to time (default: %(default)s)")
    parser.add_argument("--units", type=int, nargs="+", default=TIMED_UNITS,
                        help="sizes C = H to time (default: %(default)s)")
    parser.add_argument("--skip-checks", action="store_true", help="skip the checks")
    parser.add_argument("--skip-training", action="store_true", help="skip the training runs")
    parser.add_argument("--skip-timings", action="store_true", help="skip the timings")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "torch")
    stack = import_stack()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(stack),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _save(report, args.out)
    if not args.skip_checks:
        report["checks"] = run_checks(stack)
        _save(report, args.out)
    if not args.skip_training:
        report["training"] = run_training(stack)
        _save(report, args.out)
    if not args.skip_timings:
        report["timings"] = run_timings(stack, args.batches, args.units, args.warmup,
                                        args.repeats, args.out, report)
    _save(report, args.out)
    text = format_report(report)
    (args.out / "gpu_layer.txt").write_text(text)
    print(text)
    return 0


# ---------------------------------------------------------------------------
# Environment.


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
    if not torch.cuda.is_available():
        sys.exit("No CUDA device visible to PyTorch.")
    try:
        import fusedlstm
        from fusedlstm.kernels.select import select_kernels
    except ImportError as error:
        sys.exit(f"{error}. Install the package first: pip install --no-deps -e {ROOT}")
    cuda_kernels = select_kernels(data_on_gpu=True)
    if cuda_kernels.__name__ != "fusedlstm.kernels.cuda":
        sys.exit(f"The fused layer would run {cuda_kernels.__name__} on GPU data; check "
                 "FUSEDLSTM_KERNEL and that numba-cuda sees the GPU.")
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


def environment(stack):
    torch = stack.torch
    info = gpu_environment(torch)
    info.update({
        "keras": stack.keras.__version__,
        "keras_backend": stack.keras.backend.backend(),
        "fusedlstm": stack.fusedlstm.__version__,
        "fusedlstm_kernel_env": os.environ.get("FUSEDLSTM_KERNEL", "auto"),
        "tf32_default": {"cudnn": torch.backends.cudnn.allow_tf32,
                         "matmul": torch.backends.cuda.matmul.allow_tf32},
    })
    return info


def set_tf32(torch, enabled):
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


# ---------------------------------------------------------------------------
# Layers and inputs.


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
    device = torch.device(DEVICE)
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
# 1. Checks.


def run_checks(stack):
    import numpy as np

    torch = stack.torch
    set_tf32(torch, False)
    rows = []
    try:
        for size in CHECK_SIZES:
            for case, (kwargs, options) in CHECK_CASES.items():
                new_rows = check_one(stack, case, size, kwargs, options,
                                     np.random.default_rng(len(rows)))
                for row in new_rows:
                    print(format_check(row), flush=True)
                rows.extend(new_rows)
    finally:
        set_tf32(torch, True)
    return rows


def check_one(stack, case, size, kwargs, options, rng):
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


def run_training(stack, samples=512, steps=50, features=32, units=64):
    import numpy as np

    torch = stack.torch
    keras = stack.keras
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, steps, features)).astype("float32")
    y = np.tanh(x[:, -10:, :4].sum(axis=(1, 2)))[:, None].astype("float32")
    set_tf32(torch, False)
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
            print(format_training(case, results[case]), flush=True)
    finally:
        set_tf32(torch, True)
    return results


# ---------------------------------------------------------------------------
# 3. Timings.


def run_timings(stack, batches, units_list, warmup, repeats, out_dir, report):
    rows = []
    report["timings"] = rows
    for H in units_list:
        for case, options in TIMED_CASES.items():
            for N in batches:
                for mode in ("forward", "train"):
                    rows.append(time_one(stack, case, options, mode, N, H, warmup, repeats))
                    print(format_timing(rows[-1]), flush=True)
            _save(report, out_dir)
    return rows


def time_one(stack, case, options, mode, N, H, warmup, repeats):
    import numpy as np

    torch = stack.torch
    rng = np.random.default_rng(N * H)
    kwargs = {k: v for k, v in options.items() if k != "mask"}
    stock, fused = make_pair(stack, H, H, return_sequences=True, **kwargs)
    x = torch.tensor(rng.standard_normal((N, TIMED_STEPS, H)), dtype=torch.float32,
                     device=DEVICE)
    mask = None
    if "mask" in options:
        mask = torch.tensor(make_mask(options["mask"], N, TIMED_STEPS, rng), device=DEVICE)
    probe = torch.randn((N, TIMED_STEPS, H), device=DEVICE)
    calls = stack.cudnn_calls
    timings = {"stock": median_ms(torch, _step(torch, stock, x, mask, probe, mode),
                                  warmup, repeats)}
    stock_path = "cudnn" if stack.cudnn_calls > calls else "loop"
    timings["fused"] = median_ms(torch, _step(torch, fused, x, mask, probe, mode),
                                 warmup, repeats)
    speedup = timings["stock"][0] / timings["fused"][0]
    target = target_speedup(case, mode, N)
    return {"case": case, "mode": mode, "N": N, "T": TIMED_STEPS, "C": H, "H": H,
            "stock_path": stock_path,
            "stock_ms": timings["stock"][0], "fused_ms": timings["fused"][0],
            "speedup": speedup, "target_speedup": target,
            "target_met": None if target is None else speedup >= target,
            "raw_ms": {"stock": timings["stock"][1], "fused": timings["fused"][1]}}


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


def median_ms(torch, fn, warmup, repeats):
    """Median wall time of `fn()` in milliseconds, the GPU synchronized around each run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


def target_speedup(case, mode, N):
    """The speedup the project aims for, or None where it sets none."""
    if N == 256:
        return 1.0
    if N <= 16 and case == "no_mask" and mode == "forward":
        return 3.0
    if N <= 16 and case in ("left_padded", "recurrent_dropout"):
        return 5.0
    return None


# ---------------------------------------------------------------------------
# Output.


def _save(report, out_dir):
    (out_dir / "gpu_layer.json").write_text(json.dumps(report, indent=1))


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


def format_report(report):
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
