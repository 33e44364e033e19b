"""Outputs and gradients of a Keras layer on the active backend, as NumPy arrays.

`outputs_and_grads` is the one measurement behind the parity checks of
`python -m fusedlstm check` and the test suite: call a layer, then
differentiate a fixed random projection of everything it returned.
"""

import keras
import numpy as np



def outputs_and_grads(layer, x, mask=None, initial_state=None, training=False, seed=1):
    """Calls `layer` and differentiates a fixed random projection of all outputs.

    Args:
        layer: a Keras layer; x: [N, T, C] NumPy inputs; mask: [N, T] bool or
            None; initial_state: `[h0, c0]` NumPy arrays or None.
        seed: seeds the projection, one standard normal float32 array per
            output, drawn in order.

    Returns:
        `(outputs, grads)` as NumPy arrays: `outputs` lists what the layer
        returned; `grads` is a dict with `x`, `h0` and `c0` (when initial
        states are given) and one entry per trainable weight name.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        run = _outputs_and_grads_tensorflow
    elif backend == "torch":
        run = _outputs_and_grads_torch
    elif backend == "jax":
        run = _outputs_and_grads_jax
    else:
        raise ValueError("outputs_and_grads supports the Keras backends tensorflow, torch and "
                         f"jax. Received: backend={backend!r}")
    outputs, grads = run(layer, x, mask, initial_state, training, seed)
    names = ["x"] + (["h0", "c0"] if initial_state is not None else [])
    names += [w.name for w in layer.trainable_weights]
    return _to_numpy(outputs), {
        name: np.zeros(1, "float32") if g is None else _to_numpy([g])[0]
        for name, g in zip(names, grads)
    }


def _probe_loss(outputs, seed):
    rng = np.random.default_rng(seed)
    loss = 0.0
    for y in outputs:
        probe = keras.ops.convert_to_tensor(rng.standard_normal(tuple(y.shape)).astype("float32"))
        loss = loss + keras.ops.sum(keras.ops.cast(y, "float32") * probe)
    return loss


def _as_list(outputs):
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _outputs_and_grads_tensorflow(layer, x, mask, initial_state, training, seed):
    import tensorflow as tf

    x = tf.constant(x)
    states = [] if initial_state is None else [tf.constant(s) for s in initial_state]
    with tf.GradientTape() as tape:
        for source in [x] + states:
            tape.watch(source)
        outputs = _as_list(layer(x, mask=None if mask is None else tf.constant(mask),
                                 initial_state=states or None, training=training))
        loss = _probe_loss(outputs, seed)
    return outputs, tape.gradient(loss, [x] + states + layer.trainable_weights)


def _outputs_and_grads_torch(layer, x, mask, initial_state, training, seed):
    import torch

    x = torch.tensor(x, requires_grad=True)
    states = [] if initial_state is None else [
        torch.tensor(s, requires_grad=True) for s in initial_state]
    outputs = _as_list(layer(x, mask=None if mask is None else torch.tensor(mask),
                             initial_state=states or None, training=training))
    sources = [x] + states + [w.value for w in layer.trainable_weights]
    grads = torch.autograd.grad(_probe_loss(outputs, seed), sources, allow_unused=True)
    return [y.detach() for y in outputs], grads


def _outputs_and_grads_jax(layer, x, mask, initial_state, training, seed):
    import jax

    if not layer.built:
        layer.build(x.shape)
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(sources):
        x, states, weights = sources
        outputs, updated = layer.stateless_call(
            weights, non_trainable, x, mask=mask, initial_state=states or None,
            training=training)
        outputs = _as_list(outputs)
        return _probe_loss(outputs, seed), (outputs, updated)

    states = [] if initial_state is None else list(initial_state)
    sources = (x, states, [v.value for v in layer.trainable_variables])
    (d_x, d_states, d_weights), (outputs, updated) = jax.grad(loss, has_aux=True)(sources)
    # Stateful states and the dropout seed advance as in an eager call.
    for variable, value in zip(layer.non_trainable_variables, updated):
        variable.assign(value)
    return outputs, [d_x, *d_states, *d_weights]


def _to_numpy(tensors):
    return [np.asarray(keras.ops.convert_to_numpy(t)) for t in tensors]
