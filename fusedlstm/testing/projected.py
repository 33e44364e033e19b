"""The CPU kernels with the input projection given, as the CUDA drivers take it.

`forward(xw, ...)` and `backward(...) -> (d_xw, d_h0, d_c0)` have the
signatures of `fusedlstm.kernels.cuda.forward` and `backward`, so that the
CUDA kernels (and anything else that starts from a projection [N, T, 4H]) can
be compared with the CPU kernels. They run the CPU drivers with the projection
as the inputs, an identity [4H, 4H] kernel and a zero bias: each product with
the identity has one nonzero term, so the projection goes through unrounded
and the inputs' gradient is exactly the projection's gradient.
"""

import numpy as np

from fusedlstm.kernels import cpu

__all__ = ["backward", "forward"]


def forward(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, activation,
            recurrent_activation, zero_output_for_mask, training):
    """`cpu.forward` on the projection `xw` [N, T, 4H]: `(outputs, h_n, c_n, saved)`."""
    identity, bias = _identity(recurrent_kernel)
    return cpu.forward(np.ascontiguousarray(xw, np.float32), identity, bias, recurrent_kernel,
                       h0, c0, mask, None, recurrent_mask, activation, recurrent_activation,
                       zero_output_for_mask, training)


def backward(recurrent_kernel, mask, recurrent_mask, activation, recurrent_activation,
             zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n):
    """`cpu.backward` of `forward`: `(d_xw [N, T, 4H], d_h0, d_c0)`.

    The weight gradients are not returned: the inputs are zeros, and so is
    `h_in` where `saved` has none (the CUDA drivers do not read it).
    """
    identity, _ = _identity(recurrent_kernel)
    N, T, H = np.shape(d_outputs)
    inputs = np.zeros((N, T, 4 * H), np.float32)
    h_in, c_seq, gates = saved
    if h_in is None:
        saved = (np.zeros((N, T, H), np.float32), c_seq, gates)
    d_xw, _, _, _, d_h0, d_c0 = cpu.backward(
        inputs, identity, recurrent_kernel, mask, None, recurrent_mask, activation,
        recurrent_activation, zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n)
    return d_xw, d_h0, d_c0


def _identity(recurrent_kernel):
    units = 4 * np.shape(recurrent_kernel)[0]
    return np.eye(units, dtype=np.float32), np.zeros(units, np.float32)
