"""Backend-agnostic helpers: run a layer and take gradients on TF or torch."""

import keras
import numpy as np

import fusedlstm


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


def as_list(y):
    return list(y) if isinstance(y, (list, tuple)) else [y]


def run_with_grads(layer, x, mask=None, initial_state=None, training=False, seed=0):
    """Calls `layer` and differentiates a fixed random projection of all outputs.

    Returns:
        `(outputs, grads)` as NumPy arrays: `outputs` lists what the layer
        returned; `grads` is a dict with `x`, `h0`, `c0` (when initial states
        are given) and one entry per trainable weight name.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _run_with_grads_tf(layer, x, mask, initial_state, training, seed)
    if backend == "torch":
        return _run_with_grads_torch(layer, x, mask, initial_state, training, seed)
    raise ValueError(f"No gradient helper for backend {backend!r}")


def _probe_loss(ys, seed):
    rng = np.random.default_rng(seed)
    loss = 0.0
    for y in ys:
        probe = keras.ops.convert_to_tensor(rng.standard_normal(tuple(y.shape)).astype("float32"))
        loss = loss + keras.ops.sum(keras.ops.cast(y, "float32") * probe)
    return loss


def _run_with_grads_tf(layer, x, mask, initial_state, training, seed):
    import tensorflow as tf

    xs = tf.constant(x)
    states = None if initial_state is None else [tf.constant(s) for s in initial_state]
    mask_t = None if mask is None else tf.constant(mask)
    with tf.GradientTape(persistent=False) as tape:
        tape.watch(xs)
        for s in states or []:
            tape.watch(s)
        ys = as_list(layer(xs, mask=mask_t, initial_state=states, training=training))
        loss = _probe_loss(ys, seed)
    weights = layer.trainable_weights
    sources = [xs] + (states or []) + weights
    grads = tape.gradient(loss, sources)
    return [to_numpy(y) for y in ys], _name_grads(grads, states, weights)


def _run_with_grads_torch(layer, x, mask, initial_state, training, seed):
    import torch

    xs = torch.tensor(x, requires_grad=True)
    states = None
    if initial_state is not None:
        states = [torch.tensor(s, requires_grad=True) for s in initial_state]
    mask_t = None if mask is None else torch.tensor(mask)
    ys = as_list(layer(xs, mask=mask_t, initial_state=states, training=training))
    weights = layer.trainable_weights
    for w in weights:
        w.value.grad = None
    _probe_loss(ys, seed).backward()
    grads = [xs.grad] + [s.grad for s in states or []] + [w.value.grad for w in weights]
    return [to_numpy(y.detach()) for y in ys], _name_grads(grads, states, weights)


def _name_grads(grads, states, weights):
    names = ["x"] + (["h0", "c0"] if states else []) + [w.name for w in weights]
    return {
        name: np.zeros(1, "float32") if g is None else to_numpy(g)
        for name, g in zip(names, grads)
    }
