"""Conversions between `keras.layers.LSTM`, `fusedlstm.LSTM` and `torch.nn.LSTM`, and export.

Both Keras layers hold the same weights in the same order, so a model converts
by cloning it with every LSTM swapped for the other class
(`keras.models.clone_model` with a `clone_function`) and copying the weights
over unchanged.

A `torch.nn.LSTM` stacks the same four gates in the same order (i, f, c, o;
torch calls c "g") along the first axis of transposed matrices, and splits the
bias in two: `weights_to_torch` and `weights_from_torch` move one layer's
weights across. `python -m fusedlstm explain --layout torch` prints the
correspondence block by block.

`export` (or `model.export` itself) writes artifacts that serve without
fusedlstm: while Keras traces a model for export the fused layers trace the
framework's own LSTM ops. `save_portable` writes a `.keras` file that loads
as stock layers where fusedlstm is not installed.

Example:

>>> model = keras.Sequential([keras.Input((10, 8)), keras.layers.LSTM(16)])
>>> fused = fusedlstm.convert.to_fused(model)
>>> stock = fusedlstm.convert.to_stock(fused)
>>> fusedlstm.convert.export(fused, "/tmp/lstm_saved_model")
>>> fusedlstm.convert.save_portable(fused, "/tmp/lstm.keras")
>>> lstm = torch.nn.LSTM(8, 16, batch_first=True)
>>> lstm.load_state_dict(fusedlstm.convert.weights_to_torch(model.layers[0].get_weights()))
>>> model.layers[0].set_weights(fusedlstm.convert.weights_from_torch(lstm.state_dict()))
"""

import keras
import numpy as np

from fusedlstm.layer import LSTM

_FUSED_ONLY_CONFIG = ("use_fused",)
TORCH_WEIGHT_KEYS = ("weight_ih_l0", "weight_hh_l0")
TORCH_BIAS_KEYS = ("bias_ih_l0", "bias_hh_l0")


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
    """Exports `model` for serving in a process without fusedlstm.

    The same as `model.export(filepath, format=format, **kwargs)`: while Keras
    traces the model for export, each `fusedlstm.LSTM` traces the framework's
    own LSTM ops instead of its kernel (`fusedlstm.LSTM._export_loop`), so the
    artifact holds no Python callback and needs no fusedlstm to serve. With
    tanh/sigmoid activations, a bias and no mask, converters write native
    LSTM ops (ONNX `LSTM` nodes; TFLite `UNIDIRECTIONAL_SEQUENCE_LSTM` at a
    fixed batch size, builtin ops only at a dynamic one); other
    configurations export the stock layer's loop.

    Args:
        model: a `keras.Model`, called or built (as `keras.Model.export` needs).
        filepath: where to write the artifact.
        format: a format of `keras.Model.export` on the active backend:
            `"tf_saved_model"` (default; TensorFlow and JAX), `"onnx"`,
            `"litert"` (TensorFlow), `"openvino"` (TensorFlow and PyTorch;
            JAX raises a `ValueError` that names the ways that work),
            `"torch"` (PyTorch).
        **kwargs: passed to `keras.Model.export` (`input_signature`,
            `verbose`, ...).

    A functional model that was built but never called, which
    `keras.Model.export` refuses for some formats ("The model provided has
    never called"), is first called once on zeros shaped as its inputs
    (batch 1, and 1 for any other unknown dimension).
    """
    if not getattr(model, "_called", True) and "input_signature" not in kwargs:
        model(_zeros_like_inputs(model))
    model.export(filepath, format=format, **kwargs)


def _zeros_like_inputs(model):
    return keras.tree.map_structure(
        lambda x: np.zeros([1 if d is None else d for d in x.shape], x.dtype), model.inputs
        if len(model.inputs) != 1 else model.inputs[0])


def save_portable(model, filepath):
    """Saves `model` as a `.keras` file that loads without fusedlstm.

    Every `fusedlstm.LSTM` is written as a `keras.layers.LSTM` with the same
    configuration and weights (`to_stock`), so `keras.saving.load_model`
    loads it in any process; `to_fused(keras.saving.load_model(filepath))`
    gives the fused model back. A file written by `model.save` needs fusedlstm
    imported to load. The optimizer state is not saved.

    Args:
        model: a Sequential or functional `keras.Model`.
        filepath: the `.keras` path to write.
    """
    to_stock(model).save(filepath)


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


def weights_to_torch(weights):
    """The state_dict of a one-layer `torch.nn.LSTM` equal in function to `weights`.

    `weight_ih_l0` is `kernel` transposed, `weight_hh_l0` is
    `recurrent_kernel` transposed (the gate blocks keep their order), the
    Keras bias goes to `bias_ih_l0` and zeros to `bias_hh_l0`. PyTorch is
    imported here, on the first call: `load_state_dict` takes only tensors.

    Args:
        weights: the `get_weights()` of a `keras.layers.LSTM` or
            `fusedlstm.LSTM` with C input features and H units:
            `[kernel [C, 4H], recurrent_kernel [H, 4H], bias [4H]]`, or the
            first two when the layer has `use_bias=False`.

    Returns:
        A dict of CPU `torch.Tensor`s, in the arrays' dtype, for
        `torch.nn.LSTM(C, H, bias=use_bias, batch_first=True).load_state_dict`.

    Raises:
        ValueError: when `weights` are not an LSTM's two or three arrays of
            matching shapes.
        ImportError: when PyTorch is not installed.
    """
    kernel, recurrent_kernel, bias = _keras_lstm_arrays(weights)
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"weights_to_torch needs PyTorch: pip install 'fusedlstm[torch]' ({error})") from None
    arrays = {"weight_ih_l0": kernel.T, "weight_hh_l0": recurrent_kernel.T}
    if bias is not None:
        arrays.update(bias_ih_l0=bias, bias_hh_l0=np.zeros_like(bias))
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}


def weights_from_torch(state_dict):
    """The `get_weights()` of a Keras LSTM equal in function to a `torch.nn.LSTM`.

    The reverse of `weights_to_torch`: `kernel` is `weight_ih_l0`
    transposed, `recurrent_kernel` is `weight_hh_l0` transposed and `bias` is
    `bias_ih_l0 + bias_hh_l0`. PyTorch is not imported.

    Args:
        state_dict: the `state_dict()` of a one-layer, one-direction
            `torch.nn.LSTM` without `proj_size`, C inputs and H units:
            `weight_ih_l0` [4H, C], `weight_hh_l0` [4H, H] and, with
            `bias=True`, `bias_ih_l0` and `bias_hh_l0` [4H]. Tensors (on any
            device) or NumPy arrays.

    Returns:
        `[kernel [C, 4H], recurrent_kernel [H, 4H], bias [4H]]` as NumPy
        arrays, without `bias` when the torch LSTM has none, for
        `set_weights` of a `keras.layers.LSTM(H)` or `fusedlstm.LSTM(H)` with
        the same `use_bias`.

    Raises:
        ValueError: when the keys are not those of such an LSTM, or the
            shapes do not match each other.
    """
    keys = sorted(getattr(state_dict, "keys", lambda: ())())
    expected = [sorted(TORCH_WEIGHT_KEYS), sorted(TORCH_WEIGHT_KEYS + TORCH_BIAS_KEYS)]
    if keys not in expected:
        raise ValueError(
            "Expected the state_dict of a one-layer, one-direction torch.nn.LSTM without "
            f"proj_size, with the keys {expected[1]} (or {expected[0]} with bias=False). "
            f"Received: keys {keys}")
    arrays = {key: _as_numpy(value) for key, value in state_dict.items()}
    weight_ih, weight_hh = arrays["weight_ih_l0"], arrays["weight_hh_l0"]
    _check_gate_matrix("weight_ih_l0", weight_ih, "(4H, C)", gate_axis=0)
    four_h = weight_ih.shape[0]
    expected_shapes = {"weight_hh_l0": (four_h, four_h // 4)}
    expected_shapes.update({key: (four_h,) for key in TORCH_BIAS_KEYS if key in arrays})
    for key, shape in expected_shapes.items():
        if arrays[key].shape != shape:
            raise ValueError(
                f"Expected {key} of shape {shape} to match weight_ih_l0 {weight_ih.shape} "
                f"(4H = {four_h}). Received: {key} of shape {arrays[key].shape}")
    weights = [weight_ih.T.copy(), weight_hh.T.copy()]
    if "bias_ih_l0" in arrays:
        weights.append(arrays["bias_ih_l0"] + arrays["bias_hh_l0"])
    return weights


def _keras_lstm_arrays(weights):
    """`(kernel, recurrent_kernel, bias or None)` of an LSTM's `get_weights()`, checked."""
    if not isinstance(weights, (list, tuple)) or len(weights) not in (2, 3):
        raise ValueError(
            "Expected an LSTM's get_weights(): [kernel (C, 4H), recurrent_kernel (H, 4H), "
            f"bias (4H,)], or the first two without bias. Received: {_describe(weights)}")
    kernel, recurrent_kernel, *bias = (np.asarray(w) for w in weights)
    _check_gate_matrix("kernel", kernel, "(C, 4H)", gate_axis=1)
    H = kernel.shape[1] // 4
    expected = {"recurrent_kernel": (recurrent_kernel, (H, 4 * H))}
    if bias:
        expected["bias"] = (bias[0], (4 * H,))
    for name, (array, shape) in expected.items():
        if array.shape != shape:
            raise ValueError(
                f"Expected {name} of shape {shape} to match kernel {kernel.shape} "
                f"(H = {H}). Received: {name} of shape {array.shape}")
    return kernel, recurrent_kernel, bias[0] if bias else None


def _check_gate_matrix(name, array, layout, gate_axis):
    """Raises unless `array` is 2-D with a positive multiple of 4 (4H) along `gate_axis`."""
    if array.ndim != 2 or array.shape[gate_axis] == 0 or array.shape[gate_axis] % 4:
        raise ValueError(
            f"Expected {name} of shape {layout} with 4H a positive multiple of 4. "
            f"Received: {name} of shape {array.shape}")


def _as_numpy(value):
    """A torch tensor (any device) or an array-like as a NumPy array, without importing torch."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _describe(weights):
    if isinstance(weights, (list, tuple)):
        return f"{len(weights)} arrays of shapes {[np.shape(w) for w in weights]}"
    return f"weights={weights!r} of type {type(weights)}"
