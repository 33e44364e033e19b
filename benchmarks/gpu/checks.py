"""GPU checks and timings of the fused LSTM against cuDNN: kernels, layer, or both.

Needs an NVIDIA GPU, PyTorch with CUDA and cuDNN, numba-cuda, Keras (torch
backend; no TensorFlow) for `layer`, and this package installed, so that the
kernels import as `fusedlstm.kernels`. From the repository root:

    pip install --no-deps -e .
    KERAS_BACKEND=torch python benchmarks/gpu/checks.py all --out benchmarks/results/

Subcommands:

- `kernels` (`kernels.py`): the CUDA kernels on PyTorch tensors against
  `kernels.cpu` and `torch.nn.LSTM`, compute-sanitizer, timings against cuDNN.
- `layer` (`layer.py`): `fusedlstm.LSTM(use_fused=True)` against
  `keras.layers.LSTM`: checks, training, timings.
- `all`: both, in that order.

What they share (tolerances, log, environment, timing) is `harness.py`;
`benchmarks/gpu_run.py` runs a budgeted selection of both in one command.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import kernels as kernel_checks  # noqa: E402  (benchmarks/gpu/kernels.py)
import layer as layer_checks  # noqa: E402


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    harness.add_common_arguments(common)
    kernel_options = argparse.ArgumentParser(add_help=False)
    kernel_checks.add_arguments(kernel_options)
    layer_options = argparse.ArgumentParser(add_help=False)
    layer_checks.add_arguments(layer_options)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("kernels", parents=[common, kernel_options],
                        help="the CUDA kernels against cuDNN")
    commands.add_parser("layer", parents=[common, layer_options],
                        help="fusedlstm.LSTM against keras.layers.LSTM")
    commands.add_parser("all", parents=[common, kernel_options, layer_options],
                        help="kernels, then layer")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "kernels" and args.small:
        return kernel_checks.run_small_check()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command in ("kernels", "all"):
        kernel_checks.run(args)
    if args.command in ("layer", "all"):
        layer_checks.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
