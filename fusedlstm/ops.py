"""The fused LSTM sequence op, dispatched to one module per Keras backend.

Each backend module (`fusedlstm.backends.tensorflow`, `.torch`, `.jax`) exposes
the same `lstm_sequence` op (`fusedlstm.backends.contract`). On the CPU the op
is one call per direction on the CPU drivers (`kernels.cpu`), which own the
whole layer: the input projection, the recurrence and the weight gradients.
On a GPU the framework computes the input projection and the weight gradients
(`fusedlstm.backends.projection`) and the CUDA kernels the sequential part.

Data flows one way: layer -> this dispatch -> one backend module -> kernels.

For export, the same modules tell whether a trace is for an artifact that
leaves the process (`tracing_for_export`) and give the layer's arithmetic as
the framework's own serializable LSTM ops (`export_sequence`).
"""

from keras import backend

from fusedlstm.backends.contract import RecurrenceConfig

SUPPORTED_BACKENDS = ("tensorflow", "torch", "jax")
# Backends whose op is an XLA custom call rather than a Python callback.
JIT_COMPATIBLE_BACKENDS = ("jax",)
__all__ = ["JIT_COMPATIBLE_BACKENDS", "RecurrenceConfig", "SUPPORTED_BACKENDS",
           "check_export_format", "export_sequence", "export_unrolls_stock_loop",
           "lstm_sequence", "tracing_for_export"]


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
    return _backend_module().lstm_sequence(x, kernel, bias, recurrent_kernel, h0, c0, mask,
                                           input_mask, recurrent_mask, config)


def tracing_for_export(sequences):
    """Whether the layer is being traced for an artifact that leaves the process.

    There a Python callback cannot go, so the layer traces serializable ops
    instead. Keras sets no flag while `keras.Model.export` traces a model:
    each backend module reads what its framework offers (a save context, its
    own export or tracing flags, symbolic shapes) and which modules' frames
    are on the Python stack. On a backend without a fused op, False.

    Args:
        sequences: the layer's [N, T, C] inputs in this trace.
    """
    if backend.backend() not in SUPPORTED_BACKENDS:
        return False
    return _backend_module().tracing_for_export(sequences)


def check_export_format():
    """Raises a `ValueError` naming what works where the artifact being
    written cannot express an LSTM (Keras's JAX `openvino` export)."""
    _backend_module().check_export_format()


def export_unrolls_stock_loop(sequences):
    """Whether the stock loop the layer exports should be unrolled (T static).

    True where the format being written converts an unrolled loop and not a
    rolled one: on TensorFlow, LiteRT (no Flex ops then) and OpenVINO.
    """
    return _backend_module().export_unrolls_stock_loop(sequences)


def export_sequence(x, kernel, recurrent_kernel, bias, h0, c0, go_backwards):
    """The tanh/sigmoid LSTM with bias and no mask as the framework's own LSTM ops.

    TensorFlow: Keras 2's composite LSTM function (a SavedModel of plain ops,
    ONNX `LSTM` nodes through tf2onnx, TFLite's builtin
    `UNIDIRECTIONAL_SEQUENCE_LSTM`); PyTorch: `aten::lstm` (an ONNX `LSTM`
    node); JAX: None (the stock loop is what JAX serializes).

    Args:
        x: [N, T, C] float32 inputs, in the original order.
        kernel: [C, 4H]; recurrent_kernel: [H, 4H]; bias: [4H].
        h0, c0: [N, H] initial states.
        go_backwards: whether the steps run from the last one.

    Returns:
        `(outputs [N, T, H] in the order the steps ran, h_n, c_n)`, or None.
    """
    return _backend_module().export_sequence(x, kernel, recurrent_kernel, bias, h0, c0,
                                             go_backwards)


def _backend_module():
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
    return impl
