"""Temporary: the whole-layer driver API over the projection-taking drivers.

`forward`, `backward` and `warm_up` as the whole-layer `drivers` will have
them, with the projection and the weight gradients in NumPy
(`fallback.input_projection`, `fallback.weight_gradients`) around today's
kernels, with NumPy's BLAS on one thread as in `fallback` (two threads, one
core busy elsewhere, ran the S1 training step 80x slower). Deleted when
`drivers` takes x and the weights itself.
"""

import numpy as np

from ..checks import check_layer_backward, check_layer_forward
from . import drivers
from .fallback import input_projection, one_blas_thread, results_into, weight_gradients

warm_up = drivers.warm_up


@one_blas_thread
def forward(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask, recurrent_mask,
            activation, recurrent_activation, zero_output_for_mask, training, out=None):
    """See `fallback.forward`."""
    check_layer_forward(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask,
                        recurrent_mask)
    return drivers.forward(input_projection(x, kernel, bias, input_mask), recurrent_kernel,
                           h0, c0, mask, recurrent_mask, activation, recurrent_activation,
                           zero_output_for_mask, training, out=out)


@one_blas_thread
def backward(x, kernel, recurrent_kernel, mask, input_mask, recurrent_mask, activation,
             recurrent_activation, zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n,
             out=None):
    """See `fallback.backward`."""
    N, T, _, H = check_layer_backward(x, kernel, recurrent_kernel, mask, input_mask,
                                      recurrent_mask, saved, d_outputs, d_h_n, d_c_n)
    out = list(out or ())
    states = results_into([(N, H), (N, H)], out[4:6])
    d_xw, d_h0, d_c0 = drivers.backward(
        recurrent_kernel, mask, recurrent_mask, activation, recurrent_activation,
        zero_output_for_mask, saved, d_outputs, d_h_n, d_c_n,
        out=[np.empty((N, T, 4 * H), np.float32)] + states)
    return (*weight_gradients(x, kernel, input_mask, recurrent_mask, saved[0], d_xw, out[:4]),
            d_h0, d_c0)
