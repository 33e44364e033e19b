"""`python -m fusedlstm check`: checks this machine and reports.

Prints the environment (`fusedlstm.environment`), verifies that
`fusedlstm.LSTM` matches `keras.layers.LSTM` (`fusedlstm.parity_checks`:
weights byte for byte, outputs and gradients within tolerance, masked and
unmasked) and times both layers at a few shapes (`fusedlstm.timings`).
"""

import dataclasses
import json

from fusedlstm.cli.environment import (describe_environment, device_scope, format_environment,
                                   fused_backend_problem, require_module, resolve_device)
from fusedlstm.cli.errors import CliError
from fusedlstm.cli.parity_checks import PARITY_SHAPE, check_parity, format_parity
from fusedlstm.cli.timings import format_shape, format_timings, plot_timings, time_shape


def run_check(shapes, runs, json_path=None, png_path=None, device="auto"):
    """Reports the environment, parity and timings; returns the exit code.

    Args:
        shapes: `(N, T, C, H)` tuples to time.
        runs: timed calls per layer, mode and shape (the median is reported).
        json_path: where to write the results as JSON, or `None`.
        png_path: where to draw the timings, or `None`.
        device: `"auto"`, `"cpu"` or `"gpu"`.

    Returns:
        0 when parity holds, 1 when it fails.
    """
    if png_path:
        require_module("matplotlib", "--png")
    on_gpu = resolve_device(device)
    environment = describe_environment(on_gpu)
    print(format_environment(environment))
    problem = fused_backend_problem()
    if problem:
        raise CliError(problem)
    if not on_gpu:
        print(_prepare_cpu_kernels())
    with device_scope(on_gpu), _progress_bar() as progress:
        task = progress.add_task("parity with keras.layers.LSTM", total=1 + len(shapes))
        checks = check_parity()
        passed = all(check.passed for check in checks)
        print(f"\n{format_parity(checks)}\n")
        timings = []
        for shape in shapes if passed else ():
            progress.update(task, advance=1, description=f"timing N,T,C,H = {format_shape(shape)}")
            timings.append(time_shape(shape, runs))
    if passed:
        print(format_timings(timings, runs, environment["device"]))
    else:
        print("Parity FAILED: timings skipped.")
    if json_path:
        write_json(json_path, environment, checks, timings, runs)
        print(f"\nWrote {json_path}")
    if png_path and timings:
        plot_timings(png_path, timings, environment["device"])
        print(f"Wrote {png_path}")
    return 0 if passed else 1


def _prepare_cpu_kernels():
    """Compiles (first use on this machine, with a notice on stderr) or loads the CPU
    kernels the parity checks use, so that neither counts in a timing; one line."""
    from fusedlstm.cli import precompile

    lines = []
    cache_path = precompile.compile_kernels([precompile.DEFAULT_PAIR], report=lines.append)
    return f"\nKernels\n{lines[0]}\n  cached in {cache_path}"


def _progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description:<40}"), BarColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not console.is_terminal)


def write_json(path, environment, checks, timings, runs):
    """Writes the environment, parity checks and timings to `path`."""
    N, T, C, H = PARITY_SHAPE
    result = {
        "environment": environment,
        "parity": {
            "passed": all(check.passed for check in checks),
            "shape": {"N": N, "T": T, "C": C, "H": H},
            "checks": [dataclasses.asdict(check) for check in checks],
        },
        "timings": {"runs": runs, "results": [timing.as_dict() for timing in timings]},
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
