"""`python -m fusedlstm explain`: the three weight arrays of an LSTM, in words.

An LSTM with C input features and H units holds `kernel` [C, 4H],
`recurrent_kernel` [H, 4H] and `bias` [4H], the four gates side by side along
the last axis in the order i, f, c, o. `explain_lstm` spells that out with the
parameter count 4 * ((C + H) * H + H); `explain_torch_layout` maps the same
arrays, block by block, onto a `torch.nn.LSTM`'s state_dict.
"""

import dataclasses
import os

import keras

import fusedlstm
from fusedlstm.cli.errors import CliError

GATES = (("i", "input gate"), ("f", "forget gate"), ("c", "cell candidate"),
         ("o", "output gate"))
TORCH_GATE_NAMES = {"c": "g"}


@dataclasses.dataclass(frozen=True)
class LstmShape:
    """What fixes the weights of one LSTM layer.

    Attributes:
        input_dim: C, the input features per timestep.
        units: H, the LSTM units.
        use_bias: whether the layer has a bias vector.
        name: the layer's path in its model, e.g. `"bidirectional/forward_lstm"`;
            `None` for sizes given without a model.
        kind: the layer's class, `"keras.layers.LSTM"` or `"fusedlstm.LSTM"`;
            `None` without a model.
    """

    input_dim: int
    units: int
    use_bias: bool = True
    name: str | None = None
    kind: str | None = None

    @property
    def param_count(self):
        return lstm_param_count(self.input_dim, self.units, self.use_bias)


def lstm_param_count(input_dim, units, use_bias=True):
    """Parameters of an LSTM: 4 * ((C + H) * H + H), or 4 * (C + H) * H without bias."""
    return 4 * ((input_dim + units) * units + (units if use_bias else 0))


def param_arithmetic(input_dim, units, use_bias=True):
    """The parameter count as lines: the formula, the sizes put in, the result."""
    C, H = input_dim, units
    per_gate_bias = " + H" if use_bias else ""
    per_gate_bias_value = f" + {H}" if use_bias else ""
    count = lstm_param_count(C, H, use_bias)
    return [
        f"4 * ((C + H) * H{per_gate_bias})",
        f"4 * (({C} + {H}) * {H}{per_gate_bias_value})",
        f"4 * {count // 4}",
        f"{count}",
    ]


def sequence_length_note(timesteps=None):
    """The sentence that says the sequence length changes none of the weights."""
    length = "The sequence length" if timesteps is None else f"The sequence length T = {timesteps}"
    return f"{length} changes none of this: the same weights are applied at every timestep."


def explain_lstm(input_dim, units, use_bias=True, timesteps=None):
    """The shapes, gate blocks and parameter count of one LSTM, as text.

    Args:
        input_dim: C, the input features per timestep.
        units: H, the LSTM units.
        use_bias: whether the layer has a bias vector.
        timesteps: T, shown only to say that it changes nothing.
    """
    C, H = input_dim, units
    lines = [
        f"LSTM with input_dim C = {C}, units H = {H}",
        "",
        "Weights (the four gates side by side along the last axis, in the order i, f, c, o)",
        f"  kernel            (C, 4H) = {str((C, 4 * H)):<12} {C} * {4 * H} = {C * 4 * H}",
        f"  recurrent_kernel  (H, 4H) = {str((H, 4 * H)):<12} {H} * {4 * H} = {H * 4 * H}",
    ]
    if use_bias:
        lines.append(f"  bias              (4H,)   = {str((4 * H,)):<12} {4 * H}")
    lines += ["", "Gate blocks (the same ranges in kernel and recurrent_kernel; bias likewise)"]
    for g, (letter, name) in enumerate(GATES):
        symbolic = f"[:, {_multiple(g)}:{_multiple(g + 1)}]"
        numeric = f"[:, {g * H}:{(g + 1) * H}]"
        bias = f"   bias[{g * H}:{(g + 1) * H}]" if use_bias else ""
        lines.append(f"  {letter}  {name:<15} {symbolic:<12} = {numeric:<14}{bias}".rstrip())
    formula, values, product, total = param_arithmetic(C, H, use_bias)
    lines += [
        "",
        f"Parameters = {formula}",
        f"           = {values}",
        f"           = {product}",
        f"           = {total}",
        "",
        sequence_length_note(timesteps),
    ]
    return "\n".join(lines)


def _multiple(k):
    return {0: "0", 1: "H"}.get(k, f"{k}H")


def explain_torch_layout(input_dim, units, use_bias=True):
    """How one LSTM's Keras weights map onto a `torch.nn.LSTM`'s state_dict, as text.

    Block by block: torch stacks the gates along the first axis of transposed
    matrices, in the same order i, f, c (torch's g), o, and splits the bias in
    two. `fusedlstm.convert.weights_to_torch` and `weights_from_torch` apply
    this mapping.

    Args:
        input_dim: C, the input features per timestep.
        units: H, the LSTM units.
        use_bias: whether the layer has a bias vector (torch's `bias=`).
    """
    C, H = input_dim, units
    lines = [
        f"LSTM with input_dim C = {C}, units H = {H} as "
        f"torch.nn.LSTM({C}, {H}, bias={use_bias}, batch_first=True)",
        "(fusedlstm.convert.weights_to_torch and weights_from_torch do this)",
        "",
        "Gate blocks: the same order i, f, c, o in both (torch calls c \"g\"); torch's blocks",
        "are rows of the transposed Keras arrays",
        f"  {'gate':<24}{'torch state_dict':<38}Keras get_weights()",
    ]
    for g, (letter, name) in enumerate(GATES):
        rows = f"{g * H}:{(g + 1) * H}"
        torch_letter = TORCH_GATE_NAMES.get(letter, letter)
        gate = f"{letter}  {name}" + (f" ({torch_letter})" if torch_letter != letter else "")
        pairs = [(f"weight_ih_l0[{rows}, :]", f"kernel[:, {rows}].T"),
                 (f"weight_hh_l0[{rows}, :]", f"recurrent_kernel[:, {rows}].T")]
        if use_bias:
            pairs.append((f"bias_ih_l0[{rows}] + bias_hh_l0[{rows}]", f"bias[{rows}]"))
        for k, (torch_part, keras_part) in enumerate(pairs):
            lines.append(f"  {gate if k == 0 else '':<24}{torch_part:<36}= {keras_part}")
    lines += [
        "",
        "Shapes",
        f"  weight_ih_l0  (4H, C) = {str((4 * H, C)):<10}  kernel            (C, 4H) = {(C, 4 * H)}",
        f"  weight_hh_l0  (4H, H) = {str((4 * H, H)):<10}  recurrent_kernel  (H, 4H) = {(H, 4 * H)}",
    ]
    if use_bias:
        lines += [
            f"  bias_ih_l0    (4H,)   = {str((4 * H,)):<10}  bias              (4H,)   = {(4 * H,)}",
            f"  bias_hh_l0    (4H,)   = {str((4 * H,)):<10}  (none: Keras has one bias, "
            "the sum of torch's two)",
            "",
            f"Parameters: torch 4 * ((C + H) * H + 2H) = {lstm_param_count(C, H) + 4 * H}, "
            f"Keras 4 * ((C + H) * H + H) = {lstm_param_count(C, H)}:",
            f"torch's second bias adds 4H = {4 * H} parameters that compute nothing more.",
        ]
    else:
        lines += ["", f"Parameters: 4 * (C + H) * H = {lstm_param_count(C, H, use_bias)} in both."]
    return "\n".join(lines)


def load_lstm_shapes(path):
    """The saved Keras model at `path` and the `LstmShape` of every LSTM in it.

    Raises:
        CliError: when `path` is missing or is not a Keras model.
    """
    if not os.path.isfile(path):
        raise CliError(f"no such file: {path}")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a file it cannot read.
        raise CliError(f"cannot load {path} as a Keras model: {_first_line(error)}") from None
    shapes = [
        LstmShape(input_dim=layer.cell.kernel.shape[0], units=layer.units,
                  use_bias=layer.cell.use_bias, name=name,
                  kind="fusedlstm.LSTM" if isinstance(layer, fusedlstm.LSTM)
                  else "keras.layers.LSTM")
        for name, layer in lstm_layers(model)
    ]
    return model, shapes


def explain_model(model, shapes, layout="keras"):
    """`explain_lstm` (or `explain_torch_layout`) for every LSTM of `model`.

    Args:
        model: a Keras model.
        shapes: the `LstmShape` of each of its LSTMs, from `load_lstm_shapes`.
        layout: `"keras"` or `"torch"`.
    """
    if not shapes:
        return f"model {model.name!r}: no LSTM layers"
    describe = explain_torch_layout if layout == "torch" else explain_lstm
    sections = [f"== {shape.name} ({shape.kind}) ==\n"
                f"{describe(shape.input_dim, shape.units, shape.use_bias)}" for shape in shapes]
    total = sum(shape.param_count for shape in shapes)
    sections.append(f"{len(shapes)} LSTM layer(s), {total} LSTM parameters of the model's "
                    f"{model.count_params()}.")
    return "\n\n".join(sections)


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def lstm_layers(layer, prefix=""):
    """Yields `(path, layer)` for every LSTM in `layer`, wrappers and nested models included."""
    path = f"{prefix}{layer.name}"
    if isinstance(layer, keras.layers.LSTM):
        yield path, layer
        return
    if isinstance(layer, keras.layers.Bidirectional):
        children = [layer.forward_layer, layer.backward_layer]
    elif isinstance(layer, keras.layers.Wrapper):
        children = [layer.layer]
    else:
        children = getattr(layer, "layers", [])
    for child in children:
        yield from lstm_layers(child, prefix=f"{path}/")
