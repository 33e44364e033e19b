"""Conversions between `keras.layers.LSTM` and `fusedlstm.LSTM`, and export.

Both layers hold the same weights in the same order, so a model converts by
cloning it with every LSTM swapped for the other class (`keras.models.clone_model`
with a `clone_function`) and copying the weights over unchanged.

To serve a model, convert it to stock layers first: the fused kernel runs in
a Python callback, which a SavedModel cannot carry to another process.

Example:

>>> model = keras.Sequential([keras.Input((10, 8)), keras.layers.LSTM(16)])
>>> fused = fusedlstm.convert.to_fused(model)
>>> stock = fusedlstm.convert.to_stock(fused)
>>> fusedlstm.convert.export(fused, "/tmp/lstm_saved_model")
"""

import keras

from fusedlstm.layer import LSTM

_FUSED_ONLY_CONFIG = ("use_fused",)


def to_fused(model):
    """Returns a copy of `model` with every `keras.layers.LSTM` a `fusedlstm.LSTM`.

    LSTMs inside `Bidirectional` wrappers and nested models are converted
    too. Layer names, configurations and weights are kept; the weights are
    copied byte for byte. The optimizer state is not copied.

    Args:
        model: a Sequential or functional `keras.Model`.

    Returns:
        A new model; `model` is left unchanged.
    """
    return _convert(model, _to_fused_layer)


def to_stock(model):
    """Returns a copy of `model` with every `fusedlstm.LSTM` a `keras.layers.LSTM`.

    The inverse of `to_fused`: the `use_fused` argument is dropped from each
    converted layer's config, everything else is kept.

    Args:
        model: a Sequential or functional `keras.Model`.

    Returns:
        A new model; `model` is left unchanged.
    """
    return _convert(model, _to_stock_layer)


def export(model, filepath, format="tf_saved_model", **kwargs):
    """Exports `model` for serving, with its fused LSTMs as stock ones.

    The exported artifact holds no Python callback, so it serves in any
    process, for example with `tf.saved_model.load(filepath).serve(x)`. Stock
    layers compute the same function from the same weights.

    Args:
        model: a Sequential or functional `keras.Model`.
        filepath: where to write the artifact.
        format: passed to `keras.Model.export`. Default: `"tf_saved_model"`,
            which needs the TensorFlow backend.
        **kwargs: passed to `keras.Model.export`.
    """
    to_stock(model).export(filepath, format=format, **kwargs)


def _convert(model, convert_layer):
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Expected a `keras.Model`. Received: model={model!r} of type {type(model)}")
    clone = keras.models.clone_model(
        model, input_tensors=_named_inputs(model),
        clone_function=_clone_function(convert_layer), recursive=True)
    clone.set_weights(model.get_weights())
    return clone


def _named_inputs(model):
    """New inputs for a functional model, named as its input layers.

    `clone_model` would name them after the input tensors instead.
    """
    names = {id(layer.output): layer.name for layer in model.layers
             if isinstance(layer, keras.layers.InputLayer)}
    if isinstance(model, keras.Sequential) or not names:
        return None
    return keras.tree.map_structure(
        lambda x: keras.Input(batch_shape=x.shape, dtype=x.dtype, sparse=x.sparse,
                              name=names[id(x)]),
        model.input)


def _clone_function(convert_layer):
    """The `clone_function` for `clone_model`: converts LSTMs, copies other layers."""

    def clone(layer):
        if isinstance(layer, keras.layers.Bidirectional):
            config = layer.get_config()
            config.update(layer=clone(layer.forward_layer),
                          backward_layer=clone(layer.backward_layer))
            return layer.__class__(**config)
        converted = convert_layer(layer)
        if converted is None:
            return layer.__class__.from_config(layer.get_config())
        return converted

    return clone


def _to_fused_layer(layer):
    """A `fusedlstm.LSTM` configured as the stock `layer`, or None if not one."""
    if type(layer) is not keras.layers.LSTM:
        return None
    return LSTM.from_config(layer.get_config())


def _to_stock_layer(layer):
    """A `keras.layers.LSTM` configured as the fused `layer`, or None if not one."""
    if not isinstance(layer, LSTM):
        return None
    config = layer.get_config()
    for key in _FUSED_ONLY_CONFIG:
        config.pop(key)
    return keras.layers.LSTM.from_config(config)
