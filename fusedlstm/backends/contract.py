"""The contract every backend's `lstm_sequence` op keeps.

`lstm_sequence(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask,
recurrent_mask, config)` returns `(outputs [N, T, H], h_n [N, H], c_n [N, H])`,
batch-major, differentiable with respect to the inputs, the three weights and
both initial states; `config` is a `RecurrenceConfig`. Inside an op, a missing
mask travels as an empty placeholder (leading axis 0), which `none_if_empty`
turns back into None.

For export, each backend also offers `tracing_for_export(sequences)` (whether
this trace is for an artifact that leaves the process, where a Python callback
cannot go), `check_export_format()` (raises a `ValueError` naming what works
where the format being written cannot express an LSTM) and
`export_sequence(x, kernel, recurrent_kernel, bias, h0, c0, go_backwards)`
(the tanh/sigmoid LSTM with bias and no mask as the framework's own
serializable LSTM ops, `(outputs [N, T, H], h_n, c_n)` with the outputs in the
order the steps ran; None where the stock Keras loop serves best) and
`export_unrolls_stock_loop(sequences)` (whether the stock loop, where the layer
exports it, is unrolled for the format being written).
"""

import dataclasses
import sys


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


def none_if_empty(array):
    """None for the empty placeholders that stand for "no mask" (any array type)."""
    return None if array.shape[0] == 0 else array


def module_on_stack(*prefixes):
    """Whether a frame of a module named one of `prefixes`, or under one, is on the stack.

    Keras sets no flag while it traces a model for `keras.Model.export`; the
    modules of the frames that called the trace tell who asked for it.
    """
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__") or ""
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return True
        frame = frame.f_back
    return False
