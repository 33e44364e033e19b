"""The CPU kernels: `njit` step kernels, the register tile, thread blocks, host drivers.

- `steps`: the forward and backward recurrence over a block of batch rows.
- `panels`, `tile`: the recurrent kernel packed in panels and the register
  tile that multiplies a block of rows by it.
- `threads`: blocks of rows handed to a few threads.
- `drivers`: `forward` and `backward` on NumPy arrays (the same signatures as
  the CUDA drivers), `warm_up`, `aligned_empty`.
"""

from .drivers import aligned_empty, backward, forward, warm_up

__all__ = ["aligned_empty", "backward", "forward", "warm_up"]
