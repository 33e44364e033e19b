"""GPU checks and timings of the fused LSTM against cuDNN: kernels, layer, or both.

Needs an NVIDIA GPU, PyTorch with CUDA and cuDNN, numba-cuda, Keras (torch
backend; no TensorFlow) and this package installed, so that the kernels import
as `fusedlstm.kernels`. From the repository root:

    pip install --no-deps -e .
    KERAS_BACKEND=torch python benchmarks/gpu.py all --out benchmarks/results/

Subcommands:

- `kernels`: the CUDA kernels on PyTorch tensors.
  1. Correctness: forward and backward against `kernels.cpu` and against
     `torch.nn.LSTM` (cuDNN, TF32 off) with the same weights, for N in
     {1, 4, 16, 64, 256}, H in {128, 256, 512, 1024}, T in {1, 100}.
  2. compute-sanitizer memcheck and racecheck on a small multi-block case
     (`kernels --small`), when compute-sanitizer is installed.
  3. Timings against cuDNN (float32, TF32 off and on): CUDA events, median
     of many runs, warm-up and JIT excluded; microseconds per timestep next
     to a floor (one grid barrier plus 2 * N * H * 4H FLOPs at the measured
     FP32 matmul rate) and the speedups against the targets.
- `layer`: `fusedlstm.LSTM(use_fused=True)` against `keras.layers.LSTM`.
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
- `all`: both, in that order.

Each subcommand writes its report (machine, versions, raw timings, errors) to
`<out>/gpu_<name>.json`, rewritten after each part, and everything it prints
to `<out>/gpu_<name>.txt`.
"""

import argparse
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEVICE = "cuda"
STATE_TOL = OUTPUT_TOL = 1e-5
GRAD_TOL = 1e-4
TANH, SIGMOID = 0, 1

# `kernels`
CHECK_BATCHES = (1, 4, 16, 64, 256)
CHECK_UNITS = (128, 256, 512, 1024)
CHECK_STEPS = (1, 100)
FORWARD_BATCHES = (1, 4, 16, 64, 256)
FORWARD_UNITS = (256, 512, 1024)
TRAIN_BATCHES = (32, 64)
TRAIN_UNITS = (512,)
TIMED_STEPS = 100
# ||fused - cudnn|| / ||cudnn||: float32 against float32 with another summation
# order and exact activations (ours: a rational tanh, 3e-7 from exact).
CUDNN_RELATIVE_TOL = 1e-4

# `layer`
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


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for the .json and .txt results (default: %(default)s)")
    common.add_argument("--repeats", type=int, default=None,
                        help="timed runs per measurement; the median is reported "
                             "(default: 30 for kernels, 20 for layer)")
    common.add_argument("--warmup", type=int, default=3,
                        help="untimed runs first (default: %(default)s)")
    common.add_argument("--skip-checks", action="store_true", help="skip the correctness checks")
    common.add_argument("--skip-timings", action="store_true", help="skip the timings")
    kernel_options = argparse.ArgumentParser(add_help=False)
    kernel_options.add_argument(
        "--small", action="store_true",
        help="kernels: only run a small multi-block check against the CPU kernels and exit "
             "non-zero on a mismatch (what the sanitizers run)")
    kernel_options.add_argument("--skip-sanitizers", action="store_true",
                                help="kernels: skip compute-sanitizer")
    layer_options = argparse.ArgumentParser(add_help=False)
    layer_options.add_argument("--batches", type=int, nargs="+", default=TIMED_BATCHES,
                               help="layer: batch sizes N to time (default: %(default)s)")
    layer_options.add_argument("--units", type=int, nargs="+", default=TIMED_UNITS,
                               help="layer: sizes C = H to time (default: %(default)s)")
    layer_options.add_argument("--skip-training", action="store_true",
                               help="layer: skip the training runs")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("kernels", parents=[common, kernel_options],
                        help="the CUDA kernels against cuDNN")
    commands.add_parser("layer", parents=[common, layer_options],
                        help="fusedlstm.LSTM against keras.layers.LSTM")
    commands.add_parser("all", parents=[common, kernel_options, layer_options],
                        help="kernels, then layer")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "kernels" and args.small:
        return run_small_check()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command in ("kernels", "all"):
        run_kernels_command(args)
    if args.command in ("layer", "all"):
        run_layer_command(args)
    return 0


def run_kernels_command(args):
    import torch

    start_log(args.out / "gpu_kernels.txt")
    path = args.out / "gpu_kernels.json"
    report = {"environment": environment(torch), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not args.skip_checks:
        report["checks"] = run_kernel_checks()
        save_json(report, path)
    if not args.skip_sanitizers:
        report["sanitizers"] = run_sanitizers(args.out)
        save_json(report, path)
    if not args.skip_timings:
        report["timings"] = run_kernel_timings(args.warmup, args.repeats or 30)
    save_json(report, path)
    say(format_kernel_report(report))


def run_layer_command(args):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    stack = import_stack()
    start_log(args.out / "gpu_layer.txt")
    path = args.out / "gpu_layer.json"
    report = {"environment": layer_environment(stack),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
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


# ---------------------------------------------------------------------------
# Shared: output, environment, TF32, timing.


_LOG = {"path": None}


def start_log(path):
    """Makes `say` also write to `path` (started empty)."""
    path.write_text("")
    _LOG["path"] = path


def say(text):
    """Prints `text` and appends it to the current log file."""
    print(text, flush=True)
    if _LOG["path"] is not None:
        with open(_LOG["path"], "a") as log:
            log.write(text.rstrip("\n") + "\n")


def save_json(report, path):
    path.write_text(json.dumps(report, indent=1))


def environment(torch):
    """Python, torch, CUDA, cuDNN, the GPU (from nvidia-smi), package versions, git commit."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(),
        "multiprocessors": torch.cuda.get_device_properties(0).multi_processor_count,
    }
    for package in ("numpy", "numba", "numba-cuda", "cuda-core", "cuda-bindings"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    info["nvidia_smi"] = command_output(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
         "--format=csv,noheader"])
    info["git_commit"] = command_output(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    return info


def command_output(command):
    """A command's output, or why it could not run."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable: {error}"
    return done.stdout.strip() or done.stderr.strip()


def set_tf32(enabled):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def time_us(fn, stream, warmup, repeats):
    """CUDA-event times of `fn()` on `stream`, in microseconds.

    Returns:
        A dict: `median`, the median of `repeats` single calls, each timed
        alone (host work before the first kernel included); `pipelined`, the
        mean over `repeats` back-to-back calls, where host work overlaps the
        GPU work of earlier calls; `raw`, the single-call times.
    """
    import torch

    for _ in range(warmup):
        fn()
    stream.synchronize()
    raw = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        raw.append(start.elapsed_time(end) * 1000.0)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record(stream)
    for _ in range(repeats):
        fn()
    end.record(stream)
    end.synchronize()
    pipelined = start.elapsed_time(end) * 1000.0 / repeats
    return {"median": statistics.median(raw), "pipelined": pipelined, "raw": raw}


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


# ---------------------------------------------------------------------------
# kernels: problems and the three implementations.


def make_problem(N, H, T, seed=0):
    """Random inputs and weights on the GPU, input size C = H."""
    import torch

    generator = torch.Generator(device="cuda").manual_seed(seed)
    bound = H ** -0.5

    def uniform(*shape):
        return (torch.rand(*shape, device="cuda", generator=generator) * 2 - 1) * bound

    def normal(*shape):
        return torch.randn(*shape, device="cuda", generator=generator)

    return dict(
        x=normal(T, N, H), kernel=uniform(H, 4 * H), recurrent_kernel=uniform(H, 4 * H),
        bias=uniform(4 * H), h0=normal(N, H), c0=normal(N, H), d_outputs=normal(T, N, H),
        d_h_n=normal(N, H), d_c_n=normal(N, H))


def projection(problem):
    """xw [T, N, 4H] = x @ kernel + bias, in one matmul."""
    import torch

    T, N, C = problem["x"].shape
    xw = torch.addmm(problem["bias"], problem["x"].reshape(T * N, C), problem["kernel"])
    return xw.reshape(T, N, -1)


def fused_forward(problem, training, stream):
    """The projection in torch, then `kernels.cuda.forward` on torch tensors."""
    from fusedlstm.kernels import cuda as cuda_kernels

    return cuda_kernels.forward(
        projection(problem), problem["recurrent_kernel"], problem["h0"], problem["c0"], None,
        None, TANH, SIGMOID, False, training, stream=stream)


def fused_train_step(problem, stream):
    """Forward, backward and all gradients: what a layer's training step runs."""
    import torch

    from fusedlstm.kernels import cuda as cuda_kernels

    outputs, h_n, c_n, saved = fused_forward(problem, True, stream)
    d_xw, d_h0, d_c0 = cuda_kernels.backward(
        problem["recurrent_kernel"], None, None, TANH, SIGMOID, False, saved,
        problem["d_outputs"], problem["d_h_n"], problem["d_c_n"], stream=stream)
    T, N, C = problem["x"].shape
    H = problem["h0"].shape[1]
    d_xw = torch.as_tensor(d_xw, device="cuda").reshape(T * N, 4 * H)
    h_seq = torch.as_tensor(saved[0], device="cuda")
    return {
        "outputs": torch.as_tensor(outputs, device="cuda"),
        "h_n": torch.as_tensor(h_n, device="cuda"),
        "c_n": torch.as_tensor(c_n, device="cuda"),
        "x": (d_xw @ problem["kernel"].T).reshape(T, N, C),
        "kernel": problem["x"].reshape(T * N, C).T @ d_xw,
        "recurrent_kernel": h_seq[:-1].reshape(T * N, H).T @ d_xw,
        "bias": d_xw.sum(0),
        "h0": torch.as_tensor(d_h0, device="cuda"),
        "c0": torch.as_tensor(d_c0, device="cuda"),
    }


def cudnn_lstm(problem):
    """torch.nn.LSTM with the same weights: gate order i, f, g, o is Keras's i, f, c, o."""
    import torch

    H = problem["h0"].shape[1]
    lstm = torch.nn.LSTM(problem["x"].shape[2], H).cuda()
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(problem["kernel"].T)
        lstm.weight_hh_l0.copy_(problem["recurrent_kernel"].T)
        lstm.bias_ih_l0.copy_(problem["bias"])
        lstm.bias_hh_l0.zero_()
    return lstm


def cudnn_forward(lstm, problem):
    import torch

    with torch.no_grad():
        return lstm(problem["x"], (problem["h0"][None], problem["c0"][None]))


def cudnn_train_step(lstm, problem):
    import torch

    x = problem["x"].detach().requires_grad_()
    h0 = problem["h0"][None].detach().requires_grad_()
    c0 = problem["c0"][None].detach().requires_grad_()
    outputs, (h_n, c_n) = lstm(x, (h0, c0))
    wanted = (x, h0, c0, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0)
    grads = torch.autograd.grad(
        (outputs, h_n, c_n), wanted,
        (problem["d_outputs"], problem["d_h_n"][None], problem["d_c_n"][None]))
    return {
        "outputs": outputs.detach(), "h_n": h_n.detach()[0], "c_n": c_n.detach()[0],
        "x": grads[0], "h0": grads[1][0], "c0": grads[2][0], "kernel": grads[3].T,
        "recurrent_kernel": grads[4].T, "bias": grads[5],
    }


# ---------------------------------------------------------------------------
# kernels: correctness and compute-sanitizer.


def run_kernel_checks():
    import torch

    set_tf32(False)
    stream = torch.cuda.Stream()
    rows = []
    for T in CHECK_STEPS:
        for H in CHECK_UNITS:
            for N in CHECK_BATCHES:
                with torch.cuda.stream(stream):
                    rows.append(check_kernels(N, H, T, stream))
                say(f"check N={N} H={H} T={T}: {rows[-1]['passed']}")
    return {"rows": rows, "all_passed": all(row["passed"] for row in rows)}


def check_kernels(N, H, T, stream):
    """Errors of the fused kernels against kernels.cpu (max abs) and cuDNN (relative)."""
    import numpy as np
    import torch

    from fusedlstm.kernels import cpu

    problem = make_problem(N, H, T, seed=N * 7919 + H * 31 + T)
    fused = fused_train_step(problem, stream.cuda_stream)
    reference = cudnn_train_step(cudnn_lstm(problem), problem)
    stream.synchronize()

    host = {k: v.cpu().numpy() for k, v in problem.items()}
    xw = projection(problem).cpu().numpy()
    outputs, h_n, c_n, saved = cpu.forward(xw, host["recurrent_kernel"], host["h0"], host["c0"],
                                           None, None, TANH, SIGMOID, False, True)
    d_xw, d_h0, d_c0 = cpu.backward(host["recurrent_kernel"], None, None, TANH, SIGMOID, False,
                                    saved, host["d_outputs"], host["d_h_n"], host["d_c_n"])
    cpu_values = {"outputs": outputs, "h_n": h_n, "c_n": c_n, "h0": d_h0, "c0": d_c0,
                  "x": (d_xw.reshape(T * N, 4 * H) @ host["kernel"].T).reshape(T, N, H)}

    def to_numpy(a):
        return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a

    def max_error(a, b):
        return float(np.max(np.abs(to_numpy(a).astype(np.float64) - to_numpy(b))))

    def relative_error(a, b):
        a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    states = ("outputs", "h_n", "c_n")
    grads = ("x", "h0", "c0")
    row = {"N": N, "H": H, "T": T,
           "cpu_max_abs": {k: max_error(fused[k], cpu_values[k]) for k in states + grads},
           "cudnn_max_abs": {k: max_error(fused[k], reference[k]) for k in fused},
           "cudnn_relative": {k: relative_error(fused[k], reference[k]) for k in fused}}
    row["passed"] = bool(
        all(row["cpu_max_abs"][k] <= STATE_TOL for k in states)
        and all(row["cpu_max_abs"][k] <= GRAD_TOL for k in grads)
        and all(error <= CUDNN_RELATIVE_TOL for error in row["cudnn_relative"].values()))
    return row


def run_small_check():
    """Multi-block, masked, dropout and streamed-weight launches against kernels.cpu.

    Returns:
        The exit status: 0 when every case matches.
    """
    import numpy as np

    from fusedlstm.kernels import cpu
    from fusedlstm.kernels import cuda as cuda_kernels

    rng = np.random.default_rng(0)
    T, N, H = 3, 5, 40
    f32 = np.float32
    mask = np.ones((T, N), bool)
    mask[0, 1] = mask[1, 2] = False
    mask[:, 3] = False
    recurrent_mask = ((rng.random((4, N, H)) > 0.3) / 0.7).astype(f32)
    xw = rng.standard_normal((T, N, 4 * H)).astype(f32)
    u = (rng.standard_normal((H, 4 * H)) / np.sqrt(H)).astype(f32)
    h0, c0 = rng.standard_normal((2, N, H)).astype(f32)
    d_outputs = rng.standard_normal((T, N, H)).astype(f32)
    d_h_n, d_c_n = rng.standard_normal((2, N, H)).astype(f32)
    launches = [
        dict(single_block=False, units_per_block=8, block_size=64, lanes=32),
        dict(single_block=False, units_per_block=3, block_size=128, lanes=8, cache_floats=100),
        dict(single_block=True, block_size=64, lanes=16),
        dict(step_launches=True, units_per_block=6, block_size=64, lanes=8, cache_floats=200),
    ]
    worst = 0.0
    for launch in launches:
        for masks in ((None, None), (mask, recurrent_mask)):
            args = (xw, u, h0, c0) + masks + (TANH, SIGMOID, False, True)
            got = cuda_kernels.forward(*args, **launch)
            want = cpu.forward(*args)
            grads = cuda_kernels.backward(u, *masks, TANH, SIGMOID, False, got[3], d_outputs,
                                          d_h_n, d_c_n, **launch)
            want_grads = cpu.backward(u, *masks, TANH, SIGMOID, False, want[3], d_outputs,
                                      d_h_n, d_c_n)
            for a, b in zip(got[:3] + got[3] + grads, want[:3] + want[3] + want_grads):
                worst = max(worst, float(np.max(np.abs(a - b))))
    say(f"small check: max abs error {worst:.3g}")
    return 0 if worst <= GRAD_TOL else 1


# ---------------------------------------------------------------------------
# compute-sanitizer.


def run_sanitizers(out_dir):
    executable = shutil.which("compute-sanitizer") or _existing(
        "/usr/local/cuda/bin/compute-sanitizer")
    if executable is None:
        say("compute-sanitizer: not found on PATH, skipped")
        return {"available": False}
    results = {"available": True, "executable": executable}
    for tool in ("memcheck", "racecheck"):
        command = [executable, "--tool", tool, "--error-exitcode", "99", sys.executable,
                   str(Path(__file__).resolve()), "kernels", "--small"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
        log = done.stdout + done.stderr
        (out_dir / f"sanitizer_{tool}.log").write_text(log)
        summary = [line for line in log.splitlines() if "SUMMARY" in line or "small check" in line]
        results[tool] = {"returncode": done.returncode, "summary": summary,
                         "seconds": round(time.perf_counter() - started, 1)}
        say(f"compute-sanitizer {tool}: exit {done.returncode} {summary}")
    return results


def _existing(path):
    return path if os.path.exists(path) else None


# ---------------------------------------------------------------------------
# kernels: timings.


def run_kernel_timings(warmup, repeats):
    import torch

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        rates = {"fp32_matmul_tflops": measure_matmul_tflops(stream),
                 "grid_barrier_us": measure_grid_barrier_us()}
        rows = []
        for N in FORWARD_BATCHES:
            for H in FORWARD_UNITS:
                rows.append(time_forward(N, H, TIMED_STEPS, stream, warmup, repeats, rates))
                say(format_kernel_row(rows[-1]))
        for N in TRAIN_BATCHES:
            for H in TRAIN_UNITS:
                rows.append(time_train(N, H, TIMED_STEPS, stream, warmup, repeats, rates))
                say(format_kernel_row(rows[-1]))
    set_tf32(False)
    return {"rates": rates, "rows": rows}


def measure_matmul_tflops(stream, size=8192):
    import torch

    set_tf32(False)
    a = torch.randn(size, size, device="cuda")
    b = torch.randn(size, size, device="cuda")
    us = time_us(lambda: torch.mm(a, b), stream, 2, 10)["median"]
    return 2 * size ** 3 / us / 1e6


def measure_grid_barrier_us(threads=256, steps=2000):
    """Microseconds per grid barrier with one block per SM (the cheapest grid)."""
    from numba import cuda

    @cuda.jit
    def barrier_loop(steps, out):
        grid = cuda.cg.this_grid()
        for _ in range(steps):
            grid.sync()
        if cuda.grid(1) == 0:
            out[0] = steps

    blocks = cuda.get_current_device().MULTIPROCESSOR_COUNT
    out = cuda.device_array(1, dtype="int64")
    barrier_loop[blocks, threads](1, out)
    cuda.synchronize()
    start, end = cuda.event(), cuda.event()
    start.record()
    barrier_loop[blocks, threads](steps, out)
    end.record()
    end.synchronize()
    return cuda.event_elapsed_time(start, end) * 1000.0 / steps


def floor_us(N, H, rates, products=1, barriers=1):
    """Per-step floor: grid barriers plus the recurrent products at the FP32 matmul rate."""
    flops = products * 2 * N * H * 4 * H
    return barriers * rates["grid_barrier_us"] + flops / (rates["fp32_matmul_tflops"] * 1e6)


def kernel_target_speedup(kind, N, H):
    if kind == "forward":
        if N <= 16 and 256 <= H <= 1024:
            return 3.0
        if N == 64:
            return 1.5
        if N == 256:
            return 1.0
    if kind == "train" and N in (32, 64) and H == 512:
        return 1.5
    return None


def time_forward(N, H, T, stream, warmup, repeats, rates):
    problem = make_problem(N, H, T)
    lstm = cudnn_lstm(problem)
    handle = stream.cuda_stream
    return _time_three("forward", N, H, T, rates, floor_us(N, H, rates),
                       lambda: fused_forward(problem, False, handle),
                       lambda: cudnn_forward(lstm, problem), stream, warmup, repeats)


def time_train(N, H, T, stream, warmup, repeats, rates):
    problem = make_problem(N, H, T)
    lstm = cudnn_lstm(problem)
    handle = stream.cuda_stream
    # Forward and backward products, plus the dU GEMM spread over the steps.
    floor = floor_us(N, H, rates, products=3, barriers=2)
    return _time_three("train", N, H, T, rates, floor, lambda: fused_train_step(problem, handle),
                       lambda: cudnn_train_step(lstm, problem), stream, warmup, repeats)


def _time_three(kind, N, H, T, rates, floor, fused, cudnn, stream, warmup, repeats):
    """Times the fused path (TF32 off) and cuDNN with TF32 off and on."""
    set_tf32(False)
    timings = {"fused": time_us(fused, stream, warmup, repeats),
               "cudnn_fp32": time_us(cudnn, stream, warmup, repeats)}
    set_tf32(True)
    timings["cudnn_tf32"] = time_us(cudnn, stream, warmup, repeats)
    set_tf32(False)
    target = kernel_target_speedup(kind, N, H)
    per_step = {name: timing["median"] / T for name, timing in timings.items()}
    speedup_fp32 = per_step["cudnn_fp32"] / per_step["fused"]
    speedup_tf32 = per_step["cudnn_tf32"] / per_step["fused"]
    return {
        "kind": kind, "N": N, "H": H, "T": T,
        "fused_us_per_step": per_step["fused"],
        "cudnn_fp32_us_per_step": per_step["cudnn_fp32"],
        "cudnn_tf32_us_per_step": per_step["cudnn_tf32"],
        "pipelined_us_per_step": {name: timing["pipelined"] / T
                                  for name, timing in timings.items()},
        "floor_us_per_step": floor,
        "speedup_vs_cudnn_fp32": speedup_fp32,
        "speedup_vs_cudnn_tf32": speedup_tf32,
        "target_speedup": target,
        "target_met_fp32": None if target is None else speedup_fp32 >= target,
        "target_met_tf32": None if target is None else speedup_tf32 >= target,
        "raw_us": {name: timing["raw"] for name, timing in timings.items()},
    }


# ---------------------------------------------------------------------------
# kernels: output.


def format_kernel_row(row):
    target = "-" if row["target_speedup"] is None else f"{row['target_speedup']:.1f}x"
    met = {None: "-", True: "yes", False: "NO"}[row["target_met_fp32"]]
    return (f"{row['kind']:8s} N={row['N']:<4d} H={row['H']:<5d} T={row['T']:<4d}"
            f" fused {row['fused_us_per_step']:9.2f}"
            f" cudnn32 {row['cudnn_fp32_us_per_step']:9.2f}"
            f" cudnnTF32 {row['cudnn_tf32_us_per_step']:9.2f}"
            f" floor {row['floor_us_per_step']:8.2f} us/step"
            f" (pipelined fused {row['pipelined_us_per_step']['fused']:.2f})"
            f" | x{row['speedup_vs_cudnn_fp32']:.2f} (tf32 x{row['speedup_vs_cudnn_tf32']:.2f})"
            f" target {target} met {met}")


def format_kernel_report(report):
    env = report["environment"]
    lines = [f"GPU: {env['gpu']} ({env['nvidia_smi']})",
             f"torch {env['torch']} cuDNN {env['cudnn']} numba {env['numba']} "
             f"numba-cuda {env['numba-cuda']}"]
    if "checks" in report:
        failed = [row for row in report["checks"]["rows"] if not row["passed"]]
        lines.append(f"checks: {len(report['checks']['rows']) - len(failed)} passed, "
                     f"{len(failed)} failed")
        for row in failed:
            lines.append(f"  FAILED N={row['N']} H={row['H']} T={row['T']}: "
                         f"cpu {row['cpu_max_abs']} cudnn {row['cudnn_relative']}")
    if "sanitizers" in report:
        sanitizers = report["sanitizers"]
        if not sanitizers["available"]:
            lines.append("compute-sanitizer: not found")
        for tool in ("memcheck", "racecheck"):
            if tool in sanitizers:
                lines.append(f"{tool}: exit {sanitizers[tool]['returncode']} "
                             f"{sanitizers[tool]['summary']}")
    if "timings" in report:
        rates = report["timings"]["rates"]
        lines.append(f"FP32 matmul {rates['fp32_matmul_tflops']:.1f} TFLOP/s, grid barrier "
                     f"{rates['grid_barrier_us']:.2f} us")
        lines.extend(format_kernel_row(row) for row in report["timings"]["rows"])
    return "\n".join(lines) + "\n"


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
# layer: checks and training.


def run_layer_checks(stack):
    import numpy as np

    set_tf32(False)
    rows = []
    try:
        for size in CHECK_SIZES:
            for case, (kwargs, options) in CHECK_CASES.items():
                new_rows = check_layer_case(stack, case, size, kwargs, options,
                                     np.random.default_rng(len(rows)))
                for row in new_rows:
                    say(format_check(row))
                rows.extend(new_rows)
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
    target = layer_target_speedup(case, mode, N)
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
