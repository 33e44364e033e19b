"""The framework-side math around the recurrence, written once in `keras.ops`.

The input projection for all timesteps, the inputs' gradient through it, and
the weight gradients, as float32 matmuls of the framework (as oneDNN and cuDNN
sum them). Arrays are batch-major: [N, T, ...]. Backend modules import this; it
imports none of them.
"""

from keras import ops


def input_projection(x, kernel, bias, input_mask):
    """xw [N, T, 4H] = x @ kernel + bias, with per-gate input dropout if given.

    Args:
        x: [N, T, C]; kernel: [C, 4H]; bias: [4H]; input_mask: [4, N, C] or None.
    """
    if input_mask is None:
        return ops.matmul(x, kernel) + bias
    blocks = ops.split(kernel, 4, axis=1)
    projected = [ops.matmul(x * _over_steps(input_mask[g]), blocks[g]) for g in range(4)]
    return ops.concatenate(projected, axis=-1) + bias


def input_grad(d_xw, kernel, input_mask):
    """[N, T, C] gradient of the inputs through `input_projection`."""
    if input_mask is None:
        return ops.matmul(d_xw, ops.transpose(kernel))
    d_gates = ops.split(d_xw, 4, axis=-1)
    blocks = ops.split(kernel, 4, axis=1)
    grads = [ops.matmul(d, ops.transpose(k)) * _over_steps(input_mask[g])
             for g, (d, k) in enumerate(zip(d_gates, blocks))]
    return (grads[0] + grads[1]) + (grads[2] + grads[3])


def gate_weight_grad(inputs, d_xw, masks):
    """[K, 4H]: the sum over rows and steps of (inputs * masks[g]).T @ d_xw_g per gate g.

    Args:
        inputs: [N, T, K]; d_xw: [N, T, 4H]; masks: [4, N, K] or None.
    """
    if masks is None:
        return ops.einsum("ntk,ntj->kj", inputs, d_xw)
    d_gates = ops.split(d_xw, 4, axis=-1)
    return ops.concatenate(
        [ops.einsum("ntk,ntj->kj", inputs * _over_steps(masks[g]), d_gates[g])
         for g in range(4)], axis=1)


def _over_steps(mask):
    """A [N, K] mask broadcast over the steps of [N, T, K]."""
    return ops.expand_dims(mask, 1)
