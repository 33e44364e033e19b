"""The CUDA kernels: the same `forward` and `backward` host drivers as `kernels.cpu`.

`SIGNATURES` lists every kernel with its launch signatures (for compiling
them offline); `kernel_by_name` and `kernels_for` build them.
"""

from .factory import SIGNATURES, backward, forward, kernel_by_name, kernels_for

__all__ = ["SIGNATURES", "backward", "forward", "kernel_by_name", "kernels_for"]
