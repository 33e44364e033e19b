"""The fused LSTM sequence op, dispatched to one module per Keras backend.

Each backend module (`fusedlstm.backends.tensorflow`, `.torch`, `.jax`) exposes
the same `lstm_sequence` op (`fusedlstm.backends.contract`). The framework
computes the input projection for all timesteps in one matmul; the kernel runs
only the sequential part (`fusedlstm.backends.projection` holds the math around it).

Data flows one way: layer -> this dispatch -> one backend module -> kernels.
"""

from keras import backend

from fusedlstm.backends.contract import RecurrenceConfig

SUPPORTED_BACKENDS = ("tensorflow", "torch", "jax")
# Backends whose op is an XLA custom call rather than a Python callback.
JIT_COMPATIBLE_BACKENDS = ("jax",)
__all__ = ["JIT_COMPATIBLE_BACKENDS", "RecurrenceConfig", "SUPPORTED_BACKENDS", "lstm_sequence"]


def lstm_sequence(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask,
                  recurrent_mask, config):
    """Runs the fused LSTM over a batch-major sequence on the active Keras backend.

    Args:
        x: [N, T, C] float32 inputs (batch-major), in the order the steps run.
        kernel: [C, 4H]; bias: [4H]; recurrent_kernel: [H, 4H]; all float32.
        h0, c0: [N, H] float32 initial states.
        mask: [N, T] bool or None.
        input_mask: [4, N, C] float32 per-gate input dropout masks, or None.
        recurrent_mask: [4, N, H] float32 per-gate recurrent dropout masks, or None.
        config: a `RecurrenceConfig`.

    Returns:
        `(outputs [N, T, H], h_n [N, H], c_n [N, H])`.
    """
    name = backend.backend()
    if name == "tensorflow":
        from fusedlstm.backends import tensorflow as impl
    elif name == "torch":
        from fusedlstm.backends import torch as impl
    elif name == "jax":
        from fusedlstm.backends import jax as impl
    else:
        raise ValueError(
            f"The fused LSTM op supports the Keras backends {SUPPORTED_BACKENDS}. "
            f"Received: backend={name!r}"
        )
    return impl.lstm_sequence(x, kernel, bias, recurrent_kernel, h0, c0, mask,
                              input_mask, recurrent_mask, config)
