"""Backend-agnostic helpers: build layer pairs, masks, and take gradients on TF or torch."""

import keras
import numpy as np

import fusedlstm
from fusedlstm.parity import outputs_and_grads


def make_pair(random_seed=1, **kwargs):
    """A stock and a fused layer built under the same random seed."""
    keras.utils.set_random_seed(random_seed)
    stock = keras.layers.LSTM(**kwargs)
    keras.utils.set_random_seed(random_seed)
    fused = fusedlstm.LSTM(**kwargs)
    return stock, fused


def make_mask(kind, batch, steps, rng):
    """A [N, T] bool mask: right- or left-padded, or with holes and a fully masked row."""
    lengths = rng.integers(1, steps + 1, size=batch)
    lengths[0] = steps
    positions = np.arange(steps)[None, :]
    if kind == "right":
        return positions < lengths[:, None]
    if kind == "left":
        return positions >= (steps - lengths)[:, None]
    mask = rng.random((batch, steps)) > 0.3
    mask[-1] = False
    return mask


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def run_with_grads(layer, x, mask=None, initial_state=None, training=False, seed=0):
    """`fusedlstm.report.outputs_and_grads`, with the tests' default probe seed."""
    return outputs_and_grads(layer, x, mask, initial_state, training, seed)
