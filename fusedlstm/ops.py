"""The fused recurrence as a differentiable op, dispatched to one module per backend.

Each backend module (`ops_tensorflow`, `ops_torch`) exposes
`recurrence(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, config)` with
the shapes of `kernels.cpu.lstm_forward`, returning `(outputs, h_n, c_n)`. The
framework around it computes the input projection and the weight gradients;
the kernel runs only the sequential part.
"""

import dataclasses

from keras import backend
from keras import ops

SUPPORTED_BACKENDS = ("tensorflow",)


@dataclasses.dataclass(frozen=True)
class RecurrenceConfig:
    """What a kernel launch needs besides the tensors.

    Attributes:
        activation, recurrent_activation: codes from `kernels.gates`.
        zero_output_for_mask: masked steps output zeros.
        training: save what the backward pass needs during the forward pass.
    """

    activation: int
    recurrent_activation: int
    zero_output_for_mask: bool
    training: bool


def recurrence(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, config):
    """Runs the fused recurrence on the active Keras backend.

    Args:
        xw: [T, N, 4H] float32 input projection, bias included.
        recurrent_kernel: [H, 4H] float32.
        h0, c0: [N, H] float32.
        mask: [T, N] bool or None.
        recurrent_mask: [4, N, H] float32 per-gate recurrent dropout masks, or None.
        config: a `RecurrenceConfig`.

    Returns:
        `(outputs [T, N, H], h_n [N, H], c_n [N, H])`, differentiable with
        respect to `xw`, `recurrent_kernel`, `h0` and `c0`.
    """
    name = backend.backend()
    if name == "tensorflow":
        from fusedlstm import ops_tensorflow as impl
    else:
        raise ValueError(
            f"The fused LSTM op supports the Keras backends {SUPPORTED_BACKENDS}. "
            f"Received: backend={name!r}"
        )
    return impl.recurrence(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, config)


def recurrent_kernel_grad(h_prev, d_xw, recurrent_mask):
    """Gradient of `recurrent_kernel` from the per-step pre-activation gradients.

    Args:
        h_prev: [T, N, H] the hidden state entering each step.
        d_xw: [T, N, 4H] gradient of the pre-activations.
        recurrent_mask: [4, N, H] or None.

    Returns:
        [H, 4H], in one matmul over all steps and rows.
    """
    H = ops.shape(h_prev)[-1]
    if recurrent_mask is None:
        return ops.matmul(
            ops.transpose(ops.reshape(h_prev, (-1, H))), ops.reshape(d_xw, (-1, 4 * H))
        )
    d_gates = ops.reshape(d_xw, (-1, ops.shape(d_xw)[1], 4, H))
    grad = ops.einsum("tnh,gnh,tngk->hgk", h_prev, recurrent_mask, d_gates)
    return ops.reshape(grad, (H, 4 * H))
