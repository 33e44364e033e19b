"""The environment report of `python -m fusedlstm check`, and device choice.

Which framework, versions, device and kernel module the fused layer runs
with on this machine, and whether the fused path is available at all.
"""

import importlib
import os

import keras
import numba

import fusedlstm
from fusedlstm import ops as fused_ops
from fusedlstm.cli.errors import CliError


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
