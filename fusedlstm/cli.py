"""The `python -m fusedlstm` command line.

Three subcommands: `check` (the default: environment, parity with
`keras.layers.LSTM`, timings), `demo` (a small forecasting model trained with
both layers) and `explain` (the parameter arithmetic of an LSTM). A mistake a
user can make ends with one line on stderr and exit code 2; a parity failure
exits with 1.
"""

import argparse
import os
import sys

import keras

import fusedlstm

GATES = (("i", "input gate"), ("f", "forget gate"), ("c", "cell candidate"),
         ("o", "output gate"))
USAGE_ERROR = 2
DEFAULT_SHAPES = ((1, 100, 32, 128), (32, 100, 64, 256))


class CliError(Exception):
    """A mistake the user can fix; printed as one line, without a traceback."""


class _ArgumentParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line on stderr."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None):
    """Runs the command line; returns the exit code.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` when
            `None`. Without a subcommand, `check` runs.
    """
    args = build_parser().parse_args(_with_default_command(argv))
    try:
        return args.run(args)
    except CliError as error:
        print(f"fusedlstm: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("fusedlstm: interrupted", file=sys.stderr)
        return 130


def _with_default_command(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        return ["check"] + argv
    return argv


def build_parser():
    """The argument parser with its three subcommands."""
    parser = _ArgumentParser(
        prog="python -m fusedlstm",
        description="Check fusedlstm on this machine, run a demo, or explain LSTM "
                    "parameter counts. Without a subcommand, `check` runs.")
    commands = parser.add_subparsers(dest="command")

    device = _ArgumentParser(add_help=False)
    device.add_argument(
        "--device", choices=("auto", "cpu", "gpu"), default="auto",
        help="where to run: the GPU when one is visible (auto, the default), "
             "the CPU, or the GPU (an error without one)")

    check = commands.add_parser(
        "check", parents=[device],
        help="report the environment, verify parity with keras.layers.LSTM and "
             "time both layers (the default)",
        description="Report the environment, verify that fusedlstm.LSTM matches "
                    "keras.layers.LSTM on this machine and time both layers. "
                    "Exits with 1 when parity fails.")
    check.add_argument(
        "--shapes", nargs="+", type=_shape, metavar="N,T,C,H",
        default=DEFAULT_SHAPES,
        help="batch, timesteps, input features and units of each timed case "
             f"(default: {' '.join(map(format_shape, DEFAULT_SHAPES))})")
    check.add_argument("--runs", type=_positive_int, default=5,
                       help="timed calls per case; the median is reported (default: %(default)s)")
    check.add_argument("--json", type=_output_path, metavar="FILE",
                       help="also write the results to FILE as JSON")
    check.add_argument("--png", type=_output_path, metavar="FILE",
                       help="also draw the timings to FILE (needs matplotlib)")
    check.set_defaults(run=_run_check)

    demo = commands.add_parser(
        "demo", parents=[device],
        help="train a small CO2 forecasting model with both layers",
        description="Train the same small forecasting model on the Mauna Loa CO2 "
                    "series (shipped with statsmodels) with keras.layers.LSTM and "
                    "with fusedlstm.LSTM from the same initial weights; compare "
                    "losses and time per epoch and draw the forecast.")
    demo.add_argument("--epochs", type=_positive_int, default=8,
                      help="training epochs (default: %(default)s)")
    demo.add_argument("--units", type=_positive_int, default=32,
                      help="LSTM units (default: %(default)s)")
    demo.add_argument("--window", type=_positive_int, default=24,
                      help="months of history per forecast (default: %(default)s)")
    demo.add_argument("--batch-size", type=_positive_int, default=32,
                      help="batch size (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=1,
                      help="seed for the initial weights and shuffling (default: %(default)s)")
    demo.add_argument("--png", type=_output_path, metavar="FILE",
                      default="fusedlstm_demo.png",
                      help="where to draw the forecast and loss curves (default: %(default)s)")
    demo.set_defaults(run=_run_demo)

    explain = commands.add_parser(
        "explain",
        help="show the shapes, gate blocks and parameter count of an LSTM",
        description="Show the three weight arrays of an LSTM, the column range of "
                    "each gate and the parameter count 4 * ((C + H) * H + H), for "
                    "given sizes or for every LSTM in a saved .keras model.")
    explain.add_argument("--input-dim", type=_positive_int, metavar="C",
                         help="input features per timestep")
    explain.add_argument("--units", type=_positive_int, metavar="H", help="LSTM units")
    explain.add_argument("--timesteps", type=_positive_int, metavar="T",
                         help="sequence length (it changes none of the numbers)")
    explain.add_argument("--model", metavar="FILE",
                         help="explain every LSTM in this saved Keras model (.keras)")
    explain.set_defaults(run=_run_explain)
    return parser


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _shape(text):
    parts = text.split(",")
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected N,T,C,H (four positive integers), got {text!r}")
    return shape


def format_shape(shape):
    """`(1, 100, 32, 128)` as `"1,100,32,128"`, the way `--shapes` takes it."""
    return ",".join(str(n) for n in shape)


def _output_path(text):
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"no such folder for {text!r}: {folder}")
    return text


def _run_check(args):
    from fusedlstm import report

    return report.run_check(shapes=args.shapes, runs=args.runs, json_path=args.json,
                            png_path=args.png, device=args.device)


def _run_demo(args):
    from fusedlstm import demo

    return demo.run_demo(epochs=args.epochs, units=args.units, window=args.window,
                         batch_size=args.batch_size, seed=args.seed, png_path=args.png,
                         device=args.device)


def _run_explain(args):
    if args.model:
        print(explain_model(args.model))
    elif args.input_dim and args.units:
        print(explain_lstm(args.input_dim, args.units, timesteps=args.timesteps))
    else:
        raise CliError("explain needs --input-dim C and --units H, or --model FILE")
    return 0


def lstm_param_count(input_dim, units, use_bias=True):
    """Parameters of an LSTM: 4 * ((C + H) * H + H), or 4 * (C + H) * H without bias."""
    return 4 * ((input_dim + units) * units + (units if use_bias else 0))


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
    per_gate_bias = " + H" if use_bias else ""
    per_gate_bias_value = f" + {H}" if use_bias else ""
    lines += [
        "",
        f"Parameters = 4 * ((C + H) * H{per_gate_bias})",
        f"           = 4 * (({C} + {H}) * {H}{per_gate_bias_value})",
        f"           = 4 * {lstm_param_count(C, H, use_bias) // 4}",
        f"           = {lstm_param_count(C, H, use_bias)}",
        "",
    ]
    length = "The sequence length" if timesteps is None else f"The sequence length T = {timesteps}"
    lines.append(f"{length} changes none of this: the same weights are applied at every "
                 "timestep.")
    return "\n".join(lines)


def _multiple(k):
    return {0: "0", 1: "H"}.get(k, f"{k}H")


def explain_model(path):
    """`explain_lstm` for every LSTM in the saved Keras model at `path`."""
    if not os.path.isfile(path):
        raise CliError(f"no such file: {path}")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a file it cannot read.
        raise CliError(f"cannot load {path} as a Keras model: {_first_line(error)}") from None
    sections = []
    total = 0
    for name, layer in lstm_layers(model):
        kind = "fusedlstm.LSTM" if isinstance(layer, fusedlstm.LSTM) else "keras.layers.LSTM"
        C, H, use_bias = layer.cell.kernel.shape[0], layer.units, layer.cell.use_bias
        total += lstm_param_count(C, H, use_bias)
        sections.append(f"== {name} ({kind}) ==\n{explain_lstm(C, H, use_bias)}")
    if not sections:
        return f"{path}: no LSTM layers"
    sections.append(f"{len(sections)} LSTM layer(s), {total} LSTM parameters of the model's "
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
