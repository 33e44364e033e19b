"""The CPU drivers behind the CUDA drivers' API, which takes the input projection.

The CUDA drivers (`kernels.cuda`) run the recurrence alone on a precomputed
`xw = x @ kernel + bias` [N, T, 4H]; the CPU drivers (`kernels.cpu`) run the
whole layer. With `x = xw`, an identity kernel and a zero bias the CPU
drivers' projection is `xw` itself, exactly (products by one, sums of zeros),
and their input gradient is `d_xw`: so these two functions are the CPU
drivers with the CUDA drivers' signatures, for tests that compare the two or
route the GPU path through the CPU. NumPy only: no framework.
"""

import numpy as np

from fusedlstm.kernels import cpu


def forward(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, activation,
            recurrent_activation, zero_output_for_mask, training):
    """`kernels.cuda.forward`'s arguments and results, on the CPU drivers."""
    width = xw.shape[2]
    return cpu.forward(np.ascontiguousarray(xw, np.float32), np.eye(width, dtype=np.float32),
                       np.zeros(width, np.float32), recurrent_kernel, h0, c0, mask, None,
                       recurrent_mask, activation, recurrent_activation, zero_output_for_mask,
                       training)


def backward(recurrent_kernel, mask, recurrent_mask, activation, recurrent_activation,
             zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n):
    """`kernels.cuda.backward`'s arguments and results `(d_xw, d_h0, d_c0)`, on the CPU
    drivers. The weight gradients are not used: `x` is zeros, and so is `h_in` where
    `saved` has none (the CUDA drivers do not read it)."""
    N, T, H = d_outputs.shape
    h_in, c_seq, gates = saved
    if h_in is None:
        h_in = np.zeros((N, T, H), np.float32)
    d_xw, _, _, _, d_h0, d_c0 = cpu.backward(
        np.zeros((N, T, 4 * H), np.float32), np.eye(4 * H, dtype=np.float32), recurrent_kernel,
        mask, None, recurrent_mask, activation, recurrent_activation, zero_output_for_mask,
        (h_in, c_seq, gates), d_outputs, d_h_n, d_c_n)
    return d_xw, d_h0, d_c0
