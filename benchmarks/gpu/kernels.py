"""GPU checks and timings of the fused CUDA kernels against cuDNN, on PyTorch tensors.

Needs an NVIDIA GPU, PyTorch with CUDA and cuDNN, numba-cuda and this package
installed (`pip install --no-deps -e .`), so that the kernels import as
`fusedlstm.kernels`. No Keras. From the repository root:

    python benchmarks/gpu/kernels.py --out benchmarks/results/

(or `python benchmarks/gpu/checks.py kernels ...`).

1. Correctness: forward and backward against `kernels.cpu` and against
   `torch.nn.LSTM` (cuDNN, TF32 off) with the same weights, for N in
   {1, 4, 16, 64, 256}, H in {128, 256, 512, 1024}, T in {1, 100}.
2. compute-sanitizer memcheck and racecheck on a small multi-block case
   (`--small`), when compute-sanitizer is installed.
3. Timings against cuDNN (float32, TF32 off and on): CUDA events, median
   of many runs, warm-up and JIT excluded; microseconds per timestep next
   to a floor (one grid barrier plus 2 * N * H * 4H FLOPs at the measured
   FP32 matmul rate) and the speedups against the targets.

Writes `<out>/gpu_kernels.json` (rewritten after each part) and everything it
prints to `<out>/gpu_kernels.txt`.
"""

import glob
import os
from contextlib import nullcontext
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import (GRAD_TOL, ROOT, SIGMOID, STATE_TOL, TANH, environment, now,  # noqa: E402
                     save_json, say, set_tf32, start_log, time_us)

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


def add_arguments(parser):
    """The options of the `kernels` subcommand, beside `harness.add_common_arguments`."""
    parser.add_argument(
        "--small", action="store_true",
        help="kernels: only run a small multi-block check against the CPU kernels and exit "
             "non-zero on a mismatch (what the sanitizers run)")
    parser.add_argument("--skip-sanitizers", action="store_true",
                        help="kernels: skip compute-sanitizer")


def run(args):
    """The `kernels` subcommand: checks, sanitizers and timings, as `args` says."""
    import torch

    start_log(args.out / "gpu_kernels.txt")
    path = args.out / "gpu_kernels.json"
    report = {"environment": environment(torch), "started": now()}
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


def main(argv=None):
    return harness.run_command(__doc__.splitlines()[0], add_arguments, run, argv,
                               first=lambda args: run_small_check() if args.small else None)


# ---------------------------------------------------------------------------
# kernels: problems and the three implementations.


def make_problem(N, H, T, seed=0):
    """Random inputs and weights on the GPU, input size C = H."""
    import torch

    device = harness.DEVICE
    generator = torch.Generator(device=device).manual_seed(seed)
    bound = H ** -0.5

    def uniform(*shape):
        return (torch.rand(*shape, device=device, generator=generator) * 2 - 1) * bound

    def normal(*shape):
        return torch.randn(*shape, device=device, generator=generator)

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
    """The projection in torch, then `kernels.cuda.forward` on torch tensors.

    The drivers are batch-major: `xw` goes in as [N, T, 4H], `outputs` and the
    saved tensors come back as [N, T, ...].
    """
    from fusedlstm.kernels import cuda as cuda_kernels

    return cuda_kernels.forward(
        projection(problem).transpose(0, 1).contiguous(), problem["recurrent_kernel"],
        problem["h0"], problem["c0"], None, None, TANH, SIGMOID, False, training, stream=stream,
        **harness.launch_options())


def fused_train_step(problem, stream):
    """Forward, backward and all gradients: what a layer's training step runs.

    Returns time-major values ([T, N, ...], as `torch.nn.LSTM`).
    """
    import torch

    from fusedlstm.kernels import cuda as cuda_kernels

    def tensor(array):
        return torch.as_tensor(array, device=harness.DEVICE)

    outputs, h_n, c_n, saved = fused_forward(problem, True, stream)
    d_xw, d_h0, d_c0 = cuda_kernels.backward(
        problem["recurrent_kernel"], None, None, TANH, SIGMOID, False, saved,
        problem["d_outputs"].transpose(0, 1).contiguous(), problem["d_h_n"], problem["d_c_n"],
        stream=stream, **harness.launch_options())
    T, N, C = problem["x"].shape
    H = problem["h0"].shape[1]
    d_xw = tensor(d_xw).transpose(0, 1).reshape(T * N, 4 * H)
    h_in = tensor(saved[0]).transpose(0, 1).reshape(T * N, H)
    return {
        "outputs": tensor(outputs).transpose(0, 1),
        "h_n": tensor(h_n),
        "c_n": tensor(c_n),
        "x": (d_xw @ problem["kernel"].T).reshape(T, N, C),
        "kernel": problem["x"].reshape(T * N, C).T @ d_xw,
        "recurrent_kernel": h_in.T @ d_xw,
        "bias": d_xw.sum(0),
        "h0": tensor(d_h0),
        "c0": tensor(d_c0),
    }


def cudnn_lstm(problem):
    """torch.nn.LSTM with the same weights: gate order i, f, g, o is Keras's i, f, c, o."""
    import torch

    H = problem["h0"].shape[1]
    lstm = torch.nn.LSTM(problem["x"].shape[2], H).to(problem["x"].device)
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


def run_kernel_checks(batches=CHECK_BATCHES, units=CHECK_UNITS, steps=CHECK_STEPS,
                      on_row=None):
    """`check_kernels` for every (N, H, T); `{"rows": [...], "all_passed": bool}`.

    `on_row(rows)`, when given, is called after each row (to save progress).
    """
    import torch

    set_tf32(False)
    # No stream on the CPU (a dry run: the kernels run in the simulator).
    stream = torch.cuda.Stream() if harness.on_gpu() else None
    rows = []
    for T in steps:
        for H in units:
            for N in batches:
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    rows.append(check_kernels(N, H, T, stream))
                say(f"check N={N} H={H} T={T}: {rows[-1]['passed']}")
                if on_row is not None:
                    on_row(rows)
    return {"rows": rows, "all_passed": all(row["passed"] for row in rows)}


def check_kernels(N, H, T, stream):
    """Errors of the fused kernels against kernels.cpu (max abs) and cuDNN (relative)."""
    import numpy as np
    import torch

    from fusedlstm.testing import projected

    problem = make_problem(N, H, T, seed=N * 7919 + H * 31 + T)
    fused = fused_train_step(problem, None if stream is None else stream.cuda_stream)
    reference = cudnn_train_step(cudnn_lstm(problem), problem)
    if stream is not None:
        stream.synchronize()

    # kernels.cpu is batch-major: [N, T, ...] in, time-major values out.
    host = {k: v.cpu().numpy() for k, v in problem.items()}
    xw = projection(problem).transpose(0, 1).contiguous().cpu().numpy()
    outputs, h_n, c_n, saved = projected.forward(xw, host["recurrent_kernel"], host["h0"], host["c0"],
                                                 None, None, TANH, SIGMOID, False, True)
    d_xw, d_h0, d_c0 = projected.backward(host["recurrent_kernel"], None, None, TANH, SIGMOID, False,
                                          saved, np.ascontiguousarray(host["d_outputs"].swapaxes(0, 1)),
                                          host["d_h_n"], host["d_c_n"])
    d_xw = d_xw.swapaxes(0, 1).reshape(T * N, 4 * H)
    cpu_values = {"outputs": outputs.swapaxes(0, 1), "h_n": h_n, "c_n": c_n, "h0": d_h0,
                  "c0": d_c0, "x": (d_xw @ host["kernel"].T).reshape(T, N, H)}

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


# Launches of the small check: multi-block cooperative grids (weights cached
# and streamed), one block, and one launch per step.
SMALL_LAUNCHES = (
    dict(single_block=False, units_per_block=8, block_size=64, lanes=32),
    dict(single_block=False, units_per_block=3, block_size=128, lanes=8, cache_floats=100),
    dict(single_block=True, block_size=64, lanes=16),
    dict(step_launches=True, units_per_block=6, block_size=64, lanes=8, cache_floats=200),
)
# The same kinds in the CUDA simulator, whose cooperative grids are one block.
SIMULATOR_LAUNCHES = (
    dict(single_block=False, block_size=16, lanes=8, cache_floats=100),
    dict(single_block=True, block_size=16, lanes=4),
    dict(step_launches=True, units_per_block=2, block_size=16, lanes=4, cache_floats=20),
)


def small_check_errors(launches=SMALL_LAUNCHES, T=3, N=5, H=40):
    """Max abs errors against kernels.cpu per launch, without and with masks
    (a mask with holes and a fully masked row, recurrent dropout).

    Returns:
        `[{"launch": ..., "masked": bool, "max_abs": float}, ...]`.
    """
    import numpy as np

    from fusedlstm.testing import projected
    from fusedlstm.kernels import cuda as cuda_kernels

    rng = np.random.default_rng(0)
    f32 = np.float32
    mask = np.ones((N, T), bool)
    mask[1 % N, 0] = mask[2 % N, 1 % T] = False
    mask[-1, :] = False
    recurrent_mask = ((rng.random((4, N, H)) > 0.3) / 0.7).astype(f32)
    xw = rng.standard_normal((N, T, 4 * H)).astype(f32)
    u = (rng.standard_normal((H, 4 * H)) / np.sqrt(H)).astype(f32)
    h0, c0 = rng.standard_normal((2, N, H)).astype(f32)
    d_outputs = rng.standard_normal((N, T, H)).astype(f32)
    d_h_n, d_c_n = rng.standard_normal((2, N, H)).astype(f32)
    rows = []
    for launch in launches:
        for masks in ((None, None), (mask, recurrent_mask)):
            args = (xw, u, h0, c0) + masks + (TANH, SIGMOID, False, True)
            got = cuda_kernels.forward(*args, **launch)
            want = projected.forward(*args)
            grads = cuda_kernels.backward(u, *masks, TANH, SIGMOID, False, got[3], d_outputs,
                                          d_h_n, d_c_n, **launch)
            want_grads = projected.backward(u, *masks, TANH, SIGMOID, False, want[3], d_outputs,
                                            d_h_n, d_c_n)
            worst = max(float(np.max(np.abs(a - b)))
                        for a, b in zip(got[:3] + got[3] + grads, want[:3] + want[3] + want_grads))
            rows.append({"launch": launch, "masked": masks[0] is not None, "max_abs": worst})
    return rows


def run_small_check():
    """`small_check_errors` as a command (what the sanitizers run).

    Returns:
        The exit status: 0 when every case matches.
    """
    worst = max(row["max_abs"] for row in small_check_errors())
    say(f"small check: max abs error {worst:.3g}")
    return 0 if worst <= GRAD_TOL else 1


# ---------------------------------------------------------------------------
# compute-sanitizer.


def run_sanitizers(out_dir, timeout=900):
    """memcheck and racecheck over `--small`; `{"available": False}` without the tool."""
    executable = find_sanitizer()
    if executable is None:
        say("compute-sanitizer: not found on PATH, skipped")
        return {"available": False}
    results = {"available": True, "executable": executable}
    for tool in ("memcheck", "racecheck"):
        command = [executable, "--tool", tool, "--error-exitcode", "99", sys.executable,
                   str(Path(__file__).resolve()), "--small"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        log = done.stdout + done.stderr
        (out_dir / f"sanitizer_{tool}.log").write_text(log)
        summary = [line for line in log.splitlines() if "SUMMARY" in line or "small check" in line]
        results[tool] = {"returncode": done.returncode, "summary": summary,
                         "seconds": round(time.perf_counter() - started, 1)}
        say(f"compute-sanitizer {tool}: exit {done.returncode} {summary}")
    return results


def find_sanitizer():
    """compute-sanitizer on PATH or in a CUDA toolkit under /usr/local, else None."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"), reverse=True)
    return next((path for path in candidates if os.access(path, os.X_OK)), None)


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


if __name__ == "__main__":
    sys.exit(main())
