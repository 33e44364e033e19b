"""TensorFlow glue: the fused recurrence as a `tf.custom_gradient` op.

The kernels run in `tf.numpy_function` callbacks on the CPU; their NumPy host
drivers allocate the outputs. When the forward pass ran without saving
(inference), a gradient request recomputes it with saving.
"""

import functools

import numpy as np
import tensorflow as tf

from fusedlstm import ops
from fusedlstm.kernels import cpu as kernels

_F32 = tf.float32


def recurrence(xw, recurrent_kernel, h0, c0, mask, recurrent_mask, config):
    """See `fusedlstm.ops.recurrence`."""
    xw, recurrent_kernel, h0, c0 = (
        tf.convert_to_tensor(t, _F32) for t in (xw, recurrent_kernel, h0, c0))
    no_mask = tf.zeros([0, tf.shape(xw)[1]], tf.bool)
    mask_arg = no_mask if mask is None else tf.cast(mask, tf.bool)
    rmask_arg = tf.zeros([0, 0, 0], _F32) if recurrent_mask is None else recurrent_mask
    forward = functools.partial(_forward, config)
    backward = functools.partial(_backward, config)

    def run_forward(xw, u, h0, c0, save):
        count = 6 if save else 3
        results = tf.numpy_function(
            functools.partial(forward, save=save),
            [xw, u, h0, c0, mask_arg, rmask_arg], [_F32] * count, stateful=False)
        _set_shapes(results, xw.shape, u.shape[0])
        return results

    @tf.custom_gradient
    def fused(xw, u, h0, c0):
        results = run_forward(xw, u, h0, c0, save=config.training)

        def grad(d_outputs, d_h_n, d_c_n):
            saved = results[3:] if config.training else run_forward(xw, u, h0, c0, True)[3:]
            h_seq, c_seq, gates = saved
            d_xw, d_h0, d_c0 = tf.numpy_function(
                backward,
                [u, mask_arg, rmask_arg, c_seq, gates,
                 _zeros_if_none(d_outputs, results[0]),
                 _zeros_if_none(d_h_n, h0), _zeros_if_none(d_c_n, c0)],
                [_F32] * 3, stateful=False)
            d_xw.set_shape(xw.shape)
            d_h0.set_shape(h0.shape)
            d_c0.set_shape(c0.shape)
            d_u = ops.recurrent_kernel_grad(h_seq[:-1], d_xw, recurrent_mask)
            return d_xw, d_u, d_h0, d_c0

        return tuple(results[:3]), grad

    return fused(xw, recurrent_kernel, h0, c0)


def _forward(config, xw, u, h0, c0, mask, recurrent_mask, save):
    outputs, h_n, c_n, saved = kernels.forward(
        xw, u, h0, c0, _none_if_empty(mask), _none_if_empty(recurrent_mask),
        config.activation, config.recurrent_activation,
        config.zero_output_for_mask, save)
    return (outputs, h_n, c_n) + (tuple(saved) if save else ())


def _backward(config, u, mask, recurrent_mask, c_seq, gates, d_outputs, d_h_n, d_c_n):
    return kernels.backward(
        u, _none_if_empty(mask), _none_if_empty(recurrent_mask),
        config.activation, config.recurrent_activation, config.zero_output_for_mask,
        (None, c_seq, gates), d_outputs, d_h_n, d_c_n)


def _none_if_empty(array):
    return None if array.shape[0] == 0 else array


def _zeros_if_none(grad, like):
    return tf.zeros_like(like) if grad is None else grad


def _set_shapes(results, xw_shape, units):
    steps, batch = xw_shape[0], xw_shape[1]
    state = tf.TensorShape([batch, units])
    shapes = [tf.TensorShape([steps, batch, units]), state, state]
    if len(results) == 6:
        seq_steps = None if steps is None else steps + 1
        seq = tf.TensorShape([seq_steps, batch, units])
        shapes += [seq, seq, tf.TensorShape([steps, batch, 4 * units])]
    for tensor, shape in zip(results, shapes):
        tensor.set_shape(shape)
