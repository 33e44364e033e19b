"""The `python -m fusedlstm` command line.

Four subcommands: `check` (the default: environment, parity with
`keras.layers.LSTM`, timings), `compile` (the CPU kernels into Numba's disk
cache, ahead of time), `demo` (a small forecasting model trained with both
layers) and `explain` (the weight layout and parameter arithmetic of an LSTM,
in words or as a picture). A mistake a user can make ends with one line
on stderr and exit code 2; a parity failure exits with 1.

Each subcommand is one `_add_*` function in `SUBCOMMANDS` that adds its parser
and sets `run`, the function that carries it out.
"""

import argparse
import os
import sys

from fusedlstm.cli.errors import USAGE_ERROR, CliError
from fusedlstm.cli.timings import format_shape

DEFAULT_SHAPES = ((1, 100, 32, 128), (32, 100, 64, 256))
LAYOUTS = ("keras", "torch")


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
    """The argument parser with one subparser per entry of `SUBCOMMANDS`."""
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
    for add_command in SUBCOMMANDS:
        add_command(commands, device)
    return parser


def _add_check(commands, device):
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


def _add_demo(commands, device):
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


def _add_explain(commands, device):
    explain = commands.add_parser(
        "explain",
        help="show the shapes, gate blocks and parameter count of an LSTM",
        description="Show the three weight arrays of an LSTM, the column range of "
                    "each gate and the parameter count 4 * ((C + H) * H + H), for "
                    "given sizes or for every LSTM in a saved .keras model; "
                    "optionally as a picture, or mapped onto torch.nn.LSTM.")
    explain.add_argument("--input-dim", type=_positive_int, metavar="C",
                         help="input features per timestep")
    explain.add_argument("--units", type=_positive_int, metavar="H", help="LSTM units")
    explain.add_argument("--timesteps", type=_positive_int, metavar="T",
                         help="sequence length (it changes none of the numbers)")
    explain.add_argument("--model", metavar="FILE",
                         help="explain every LSTM in this saved Keras model (.keras)")
    explain.add_argument("--layout", choices=LAYOUTS, default="keras",
                         help="keras: Keras's arrays and gate blocks (the default); torch: "
                              "which block of a torch.nn.LSTM's state_dict each one is")
    explain.add_argument("--png", type=_output_path, metavar="FILE",
                         help="also draw the three arrays of each LSTM to scale to FILE "
                              "(needs matplotlib)")
    explain.set_defaults(run=_run_explain)


def _add_compile(commands, device):
    from fusedlstm.kernels.gates import ACTIVATION_CODES
    from fusedlstm.cli.precompile import DEFAULT_PAIR

    compile_ = commands.add_parser(
        "compile",
        help="compile the CPU kernels into Numba's disk cache ahead of time",
        description="Compile the CPU kernels of an activation pair (or of every pair) "
                    "into Numba's on-disk cache, so that the first call of a layer in a "
                    "later process loads them instead of compiling them: for container "
                    "images and job start-up.")
    names = sorted(ACTIVATION_CODES)
    compile_.add_argument("--activation", choices=names, default=DEFAULT_PAIR[0],
                          help="the layer's activation (default: %(default)s)")
    compile_.add_argument("--recurrent-activation", choices=names, default=DEFAULT_PAIR[1],
                          help="the layer's recurrent activation (default: %(default)s)")
    compile_.add_argument("--all-pairs", action="store_true",
                          help=f"every pair of {', '.join(names)} ({len(names) ** 2} pairs)")
    compile_.add_argument("--inference", action="store_true",
                          help="only the forward kernel (no training)")
    compile_.set_defaults(run=_run_compile)


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


def _output_path(text):
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"no such folder for {text!r}: {folder}")
    return text


def _run_check(args):
    from fusedlstm.cli import report

    return report.run_check(shapes=args.shapes, runs=args.runs, json_path=args.json,
                            png_path=args.png, device=args.device)


def _run_compile(args):
    from fusedlstm.cli import precompile

    pairs = precompile.activation_pairs(args.activation, args.recurrent_activation,
                                        args.all_pairs)
    print(f"Compiling the CPU kernels of {len(pairs)} activation pair(s)")
    cache_path = precompile.compile_kernels(pairs, training=not args.inference)
    print(f"Cached in {cache_path}")
    return 0


def _run_demo(args):
    from fusedlstm.cli import demo

    return demo.run_demo(epochs=args.epochs, units=args.units, window=args.window,
                         batch_size=args.batch_size, seed=args.seed, png_path=args.png,
                         device=args.device)


def _run_explain(args):
    from fusedlstm.cli import explain

    if args.png:
        from fusedlstm.cli.environment import require_module

        require_module("matplotlib", "--png")
    if args.model:
        model, shapes = explain.load_lstm_shapes(args.model)
        print(explain.explain_model(model, shapes, layout=args.layout))
    elif args.input_dim and args.units:
        shapes = [explain.LstmShape(args.input_dim, args.units)]
        if args.layout == "torch":
            print(explain.explain_torch_layout(args.input_dim, args.units))
        else:
            print(explain.explain_lstm(args.input_dim, args.units, timesteps=args.timesteps))
    else:
        raise CliError("explain needs --input-dim C and --units H, or --model FILE")
    if args.png:
        _draw_layout(args.png, shapes, args.timesteps)
    return 0


def _draw_layout(path, shapes, timesteps):
    from fusedlstm.cli import layout_figure

    if not shapes:
        raise CliError("--png: no LSTM layers to draw")
    layout_figure.save_layout(path, shapes, timesteps=timesteps)
    print(f"\nWrote {path}")


SUBCOMMANDS = (_add_check, _add_compile, _add_demo, _add_explain)
