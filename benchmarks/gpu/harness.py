"""What the GPU checks share: tolerances, the report log, environment, TF32 and timing.

Used by `kernels.py` and `layer.py` (and `benchmarks/gpu_run.py`). `DEVICE` is
the torch device the checks put their tensors on: "cuda" on a GPU, "cpu" in
a dry run with the CUDA simulator (`use_device`).
"""

import argparse
import json
import platform
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEVICE = "cuda"
STATE_TOL = OUTPUT_TOL = 1e-5
GRAD_TOL = 1e-4
TANH, SIGMOID = 0, 1


def use_device(device):
    """Puts the checks' tensors on `device` ("cuda", or "cpu" under the simulator)."""
    global DEVICE
    DEVICE = device


def on_gpu():
    return DEVICE == "cuda"


# Driver launch options in the CUDA simulator: few threads per block (each is a
# Python thread there). On a GPU the drivers' defaults.
SIMULATOR_LAUNCH = {"block_size": 16, "lanes": 4}


def launch_options():
    """Launch options for the CUDA drivers on the current device."""
    return {} if on_gpu() else dict(SIMULATOR_LAUNCH)


def synchronize(torch):
    """Waits for the GPU (nothing to wait for on the CPU)."""
    if on_gpu():
        torch.cuda.synchronize()


def add_common_arguments(parser):
    """The options every subcommand takes."""
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for the .json and .txt results (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per measurement; the median is reported "
                             "(default: 30 for kernels, 20 for layer)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed runs first (default: %(default)s)")
    parser.add_argument("--skip-checks", action="store_true", help="skip the correctness checks")
    parser.add_argument("--skip-timings", action="store_true", help="skip the timings")


def run_command(description, add_arguments, run, argv=None, first=None):
    """The `main` of a check script: its options and the common ones, then `run(args)`.

    `first(args)`, when given, runs before anything else; a status it returns
    (not None) ends the command there.
    """
    parser = argparse.ArgumentParser(description=description)
    add_common_arguments(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if first is not None:
        status = first(args)
        if status is not None:
            return status
    args.out.mkdir(parents=True, exist_ok=True)
    run(args)
    return 0


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%S")


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
    gpu = on_gpu() and torch.cuda.is_available()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if gpu else None,
        "gpu": torch.cuda.get_device_name() if gpu else None,
        "multiprocessors": torch.cuda.get_device_properties(0).multi_processor_count if gpu
        else None,
    }
    for package in ("numpy", "numba", "numba-cuda", "cuda-core", "cuda-bindings", "keras"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    info["nvidia_smi"] = command_output(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
         "--format=csv,noheader"]) if gpu else None
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
    """Median wall time of `fn()` in milliseconds, the GPU synchronized around each run.

    Returns:
        `(median, times)`.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(torch)
        start = time.perf_counter()
        fn()
        synchronize(torch)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times
