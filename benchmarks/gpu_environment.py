"""What a GPU benchmark records about the machine it ran on."""

import platform
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gpu_environment(torch):
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
