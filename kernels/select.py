"""Chooses the CPU or the CUDA kernels.

The environment variable `FUSEDLSTM_KERNEL` picks them:

- `auto` (the default): the CUDA kernels when a GPU is present and the data
  is on it, else the CPU kernels.
- `cpu`: always the CPU kernels.
- `cuda`: always the CUDA kernels. NumPy data is copied to the device and
  back; with `NUMBA_ENABLE_CUDASIM=1` this runs the CUDA kernels in the Numba
  CUDA simulator, on the CPU.
"""

import os

KERNEL_ENV = "FUSEDLSTM_KERNEL"
CHOICES = ("auto", "cpu", "cuda")


def select_kernels(data_on_gpu):
    """Returns the kernel module to use: `kernels.cpu` or `kernels.cuda`.

    Both modules have the same `forward` and `backward` host drivers.

    Args:
        data_on_gpu: whether the layer's inputs live on a GPU.

    Raises:
        ValueError: `FUSEDLSTM_KERNEL` is not one of `CHOICES`.
    """
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in CHOICES:
        raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(CHOICES)}; "
                         f"received {choice!r}.")
    if choice == "cuda" or (choice == "auto" and data_on_gpu and _gpu_present()):
        from . import cuda
        return cuda
    from . import cpu
    return cpu


def _gpu_present():
    from numba import cuda
    return cuda.is_available()
