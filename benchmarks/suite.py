"""What the runners share: one pytest-benchmark suite per implementation in a process of
its own (TensorFlow's, torch's and XLA's thread pools would compete), read back as JSON;
the medians, the machine's measured peak sgemm, and each shape's floor."""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
QUICK_ENV = "FUSEDLSTM_BENCH_QUICK"


def runner_arguments(doc, add_arguments=None):
    """The arguments every runner takes (`--out`, `-k`, `--quick`, and what
    `add_arguments(parser)` adds), with `--out` created.

    `--quick` keeps every row at tiny shapes and two rounds (a smoke test) and writes
    into a temporary directory unless `--out` is given, never into `results/`.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if add_arguments:
        add_arguments(parser)
    parser.add_argument("--out", default=None, help=f"default {RESULTS}")
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, two rounds: checks that every process and row runs")
    args = parser.parse_args()
    if args.quick:
        os.environ[QUICK_ENV] = "1"
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="fusedlstm-bench-") if args.quick else RESULTS
    os.makedirs(args.out, exist_ok=True)
    return args


def run_suite(tests, framework, json_path, select=None, keras_backend=None):
    """Runs the pytest `tests` (files or node ids under benchmarks/) with `--framework
    framework`, keeping `-k select` tests, on `keras_backend` when given (else the
    environment's).

    Returns:
        The pytest-benchmark JSON as a dict.
    """
    command = [sys.executable, "-m", "pytest", *(os.path.join(HERE, t) for t in tests),
               f"--framework={framework}", f"--benchmark-json={json_path}", "-q",
               "-p", "no:randomly"]
    if select:
        command += ["-k", select]
    env = dict(os.environ, KERAS_BACKEND=keras_backend) if keras_backend else None
    subprocess.run(command, check=True, cwd=os.path.dirname(HERE), env=env)
    with open(json_path) as f:
        return json.load(f)


def machine_facts(runs):
    """The machine facts of the first run, plus each process's own thread counts and
    BLAS and OpenMP libraries (each process loads its own).

    Args:
        runs: {process name: pytest-benchmark JSON}.
    """
    facts = dict(next(iter(runs.values()))["machine_info"]["facts"])
    facts["by_process"] = {
        name: {key: run["machine_info"]["facts"][key] for key in ("threads", "blas", "openmp")}
        for name, run in runs.items()}
    return facts


def benchmarks(runs, kind=None):
    """`[(extra_info, stats)]` of every benchmark in `runs`, of one `kind` when given
    (benchmarks without a kind are the layer timings)."""
    return [(b["extra_info"], b["stats"]) for run in runs for b in run["benchmarks"]
            if b["extra_info"].get("kind") == kind]


def peak_sgemm(runs):
    """{library: GFLOP/s} of `test_cpu_gemm.py::test_peak_sgemm` (median time), plus
    "best": the machine's measured peak, the fastest of them."""
    rates = {info["library"]: info["flops"] / stats["median"] / 1e9
             for info, stats in benchmarks(runs, "peak")}
    if rates:
        rates["best"] = max(rates.values())
    return rates


def floor_ms(flops, peak_gflops):
    """`flops` (a layer's, `cases.layer_flops`) at the machine's peak sgemm rate, in ms."""
    return flops / (peak_gflops * 1e9) * 1e3


def write_results(out, name, payload, markdown):
    """Writes `payload` to `NAME-YYYY-MM-DD.json` and `markdown` to `.md` under `out`,
    prints the table, and returns the path without its extension."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = os.path.join(out, f"{name}-{stamp}")
    with open(stem + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    print(markdown)
    return stem
