"""The framework-side math around the recurrence, written once in `keras.ops`.

The input projection for all timesteps, the inputs' gradient through it, and
the weight gradients the GPU paths compute as matmuls. Backend modules import
this; it imports none of them.
"""

from keras import ops


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
