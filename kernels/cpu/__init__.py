"""The CPU kernels: `njit` step kernels, the register tile, thread blocks, host drivers.

- `steps`: the whole layer, forward and backward, over a block of batch rows:
  the input projection, the recurrence, the input and weight gradients.
- `panels`, `tile`: the weights packed in panels and the register tiles that
  multiply a block of rows by them (or add such products up).
- `threads`: blocks of rows handed to a few threads.
- `drivers`: `forward` and `backward` on NumPy arrays (inputs and weights in;
  the CUDA drivers take the input projection instead), `warm_up`,
  `aligned_empty`.
"""

from .drivers import aligned_empty, backward, forward, warm_up

__all__ = ["aligned_empty", "backward", "forward", "warm_up"]
