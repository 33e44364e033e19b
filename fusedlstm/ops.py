"""The fused LSTM sequence op, dispatched to one module per Keras backend.

Each backend module (`ops_tensorflow`, `ops_torch`) exposes
`lstm_sequence(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask,
recurrent_mask, config)` returning `(outputs, h_n, c_n)`, differentiable with
respect to the inputs, the three weights and both initial states. The framework
computes the input projection for all timesteps in one matmul; the kernel runs
only the sequential part.
"""

import dataclasses

from keras import backend
from keras import ops

SUPPORTED_BACKENDS = ("tensorflow", "torch")


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


def lstm_sequence(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask,
                  recurrent_mask, config):
    """Runs the fused LSTM over a time-major sequence on the active Keras backend.

    Args:
        x: [T, N, C] float32 inputs, in the order the steps run.
        kernel: [C, 4H]; bias: [4H]; recurrent_kernel: [H, 4H]; all float32.
        h0, c0: [N, H] float32 initial states.
        mask: [T, N] bool or None.
        input_mask: [4, N, C] float32 per-gate input dropout masks, or None.
        recurrent_mask: [4, N, H] float32 per-gate recurrent dropout masks, or None.
        config: a `RecurrenceConfig`.

    Returns:
        `(outputs [T, N, H], h_n [N, H], c_n [N, H])`.
    """
    name = backend.backend()
    if name == "tensorflow":
        from fusedlstm import ops_tensorflow as impl
    elif name == "torch":
        from fusedlstm import ops_torch as impl
    else:
        raise ValueError(
            f"The fused LSTM op supports the Keras backends {SUPPORTED_BACKENDS}. "
            f"Received: backend={name!r}"
        )
    return impl.lstm_sequence(x, kernel, bias, recurrent_kernel, h0, c0, mask,
                              input_mask, recurrent_mask, config)


def input_projection(x, kernel, bias, input_mask):
    """xw [T, N, 4H] = x @ kernel + bias, with per-gate input dropout if given."""
    if input_mask is None:
        return ops.matmul(x, kernel) + bias
    blocks = ops.split(kernel, 4, axis=1)
    projected = [ops.matmul(x * input_mask[g], blocks[g]) for g in range(4)]
    return ops.concatenate(projected, axis=-1) + bias


def input_grad(d_xw, kernel, input_mask):
    """[T, N, C] gradient of the inputs through `input_projection`.

    One matmul per gate, so that each sums over H rather than 4H terms: the
    stock layer's error, not four times it.
    """
    d_gates = ops.split(d_xw, 4, axis=-1)
    blocks = ops.split(kernel, 4, axis=1)
    grads = [ops.matmul(d, ops.transpose(k)) for d, k in zip(d_gates, blocks)]
    if input_mask is not None:
        grads = [grad * input_mask[g] for g, grad in enumerate(grads)]
    return (grads[0] + grads[1]) + (grads[2] + grads[3])


def gate_weight_grad(inputs, d_xw, masks):
    """[K, 4H]: the sum over steps and rows of (inputs * masks[g]).T @ d_xw_g per gate g.

    The GPU paths' weight gradients; the CPU kernels sum them in float64.

    Args:
        inputs: [T, N, K]; d_xw: [T, N, 4H]; masks: [4, N, K] or None.
    """
    if masks is None:
        return ops.einsum("tnk,tnj->kj", inputs, d_xw)
    shape = ops.shape(d_xw)
    d_gates = ops.reshape(d_xw, (shape[0], shape[1], 4, -1))
    grad = ops.einsum("tnk,gnk,tngj->kgj", inputs, masks, d_gates)
    return ops.reshape(grad, (ops.shape(inputs)[-1], -1))
