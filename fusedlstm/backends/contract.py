"""The contract every backend's `lstm_sequence` op keeps.

`lstm_sequence(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask,
recurrent_mask, config)` returns `(outputs [N, T, H], h_n [N, H], c_n [N, H])`,
batch-major, differentiable with respect to the inputs, the three weights and
both initial states; `config` is a `RecurrenceConfig`. Inside an op, a missing
mask travels as an empty placeholder (leading axis 0), which `none_if_empty`
turns back into None.
"""

import dataclasses


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
