"""The fused LSTM recurrence on CUDA GPUs: persistent forward and backward kernels.

Same contract as `kernels.cpu`: the framework computes `xw = x @ kernel + bias`
for all timesteps, these kernels run only the sequential part, with the same
masking, recurrent dropout and `zero_output_for_mask` semantics, and the host
drivers `forward` and `backward` take the same arguments (plus launch options)
and return the same values.

Design: one launch runs every timestep (a persistent kernel).

1. The H hidden units are cut into slices of `units` units; block `b` owns
   units `[b * units, (b + 1) * units)` for all four gates.
2. The block keeps the recurrent weights its units need in shared memory for
   the whole sequence: the 4 * units columns of `recurrent_kernel` in the
   forward pass, its `units` rows in the backward pass
   (`dh_prev[:, j] = sum_k dz[:, k] * U[j, k]`). When they do not all fit in
   `device.WEIGHT_FLOATS` floats, it keeps the first ones and streams the rest
   through L2 every step (the forward pass from a transposed copy of its own
   columns that its prologue writes, so that the loads coalesce).
3. Each step, the block stages the rows of `h` (backward: of the step's gate
   gradients) it needs in shared memory, `_CHUNK` columns at a time, and
   computes register tiles: a group of `lanes` threads owns `_ROWS` batch
   rows times 4 weight columns (the four gates of one unit forward, four
   units backward); each lane sums over a strided part of the inner
   dimension, 16 multiply-adds per 8 shared-memory loads, and a butterfly of
   warp shuffles adds the lanes' partial sums. Then the lanes of the group
   apply the cell math to different rows in parallel (backward: all threads
   over all of the block's cells).
4. A grid-wide barrier (`cuda.cg.this_grid().sync()`, a cooperative launch)
   separates timesteps; `h` is double-buffered in global memory so that one
   barrier per step suffices. The backward pass needs one barrier per step
   too: the pointwise gradients of a step, then the recurrent product.
5. When the whole problem is small, one block runs it with `syncthreads` as
   the barrier (`*_block` kernels, no cooperative launch): the same device
   functions, a cheaper barrier. `*_step` kernels run one step per launch
   over many blocks (the launch boundary is the barrier): the CUDA simulator
   runs blocks one after another, so only they test the multi-block code there.
6. The kernels are compiled once per activation pair (`kernels_for`), so the
   gate math has no runtime branch on the activation. Index arithmetic in the
   inner loops is unsigned, which spares Numba's negative-index wraparound.

The host drivers take NumPy arrays (copied to the device, results copied back
as NumPy: the `kernels.cpu` semantics, which also runs these kernels in the
CUDA simulator) or device arrays: anything with `__cuda_array_interface__`
(PyTorch CUDA tensors, Numba device arrays), a `StridedMemoryView`, or a CUDA
DLPack capsule provider. Device inputs give Numba device arrays back, written
asynchronously on the given stream. Scratch buffers are kept per device,
stream and shape and reused, so a call allocates only its outputs.

Kernels compile on first use, so importing this module needs no GPU.

Where things are:

- `device`: the device functions (prologues, register tiles, staging, the
  forward and backward steps, the barrier); the gate math is `kernels.gates`.
- `factory`: the kernels, built once per activation pair (`kernels_for`),
  and `swap_leading_axes`.
- `signatures`: `SIGNATURES` (every kernel's launch signatures, for offline
  compiles) and `kernel_by_name`.
- `launch`: launch policy (kernel choice, grid size, launch bounds, checks).
- `memory`: device-memory interop (device views, copies, scratch, streams).
- `drivers`: the host drivers `forward` and `backward`.
"""

from .drivers import backward, forward
from .factory import kernels_for
from .signatures import SIGNATURES, kernel_by_name

__all__ = ["SIGNATURES", "backward", "forward", "kernel_by_name", "kernels_for"]
