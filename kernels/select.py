"""Chooses the CPU or the CUDA kernels.

The environment variable `FUSEDLSTM_KERNEL` picks them:

- `auto` (the default): the CUDA kernels when a GPU is present and the data
  is on it, else the CPU kernels. When the CUDA kernels cannot be imported
  (numba-cuda or cuda-core missing), the CPU kernels, with one warning.
- `cpu`: always the CPU kernels.
- `cuda`: always the CUDA kernels; an `ImportError` that says what is missing
  when they cannot be imported. NumPy data is copied to the device and
  back; with `NUMBA_ENABLE_CUDASIM=1` this runs the CUDA kernels in the Numba
  CUDA simulator, on the CPU.
"""

import importlib
import os
import warnings

KERNEL_ENV = "FUSEDLSTM_KERNEL"
CHOICES = ("auto", "cpu", "cuda")
_CUDA_MODULE = __name__.rsplit(".", 1)[0] + ".cuda"
_WARNED = set()


def select_kernels(data_on_gpu):
    """Returns the kernel module to use: `kernels.cpu` or `kernels.cuda`.

    Both modules have the same `forward` and `backward` host drivers.

    Args:
        data_on_gpu: whether the layer's inputs live on a GPU.

    Raises:
        ValueError: `FUSEDLSTM_KERNEL` is not one of `CHOICES`.
        ImportError: `FUSEDLSTM_KERNEL=cuda` and the CUDA kernels cannot be
            imported.
    """
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in CHOICES:
        raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(CHOICES)}; "
                         f"received {choice!r}.")
    if choice == "cuda":
        error = cuda_import_error()
        if error is not None:
            raise ImportError(
                f"{KERNEL_ENV}=cuda asks for the CUDA kernels, but they cannot be imported: "
                f"{error}. Install numba-cuda and cuda-core (pip install numba-cuda "
                f"cuda-core), or unset {KERNEL_ENV}.") from error
        return importlib.import_module(_CUDA_MODULE)
    if choice == "auto" and data_on_gpu:
        error = cuda_import_error()
        if error is None and _gpu_present():
            return importlib.import_module(_CUDA_MODULE)
        if error is not None and "import" not in _WARNED:
            _WARNED.add("import")
            warnings.warn(f"fusedlstm: the CUDA kernels cannot be imported ({error}); the CPU "
                          "kernels run instead, through host copies.", stacklevel=2)
    from . import cpu
    return cpu


def cuda_import_error():
    """None when the CUDA kernels import, else the `ImportError` (numba-cuda or
    cuda-core missing). Imports them; never touches a GPU."""
    try:
        importlib.import_module(_CUDA_MODULE)
    except ImportError as error:
        return error
    return None


def _gpu_present():
    from numba import cuda
    return cuda.is_available()
