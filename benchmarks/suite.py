"""Runs one pytest-benchmark suite for one framework in a process of its own and
reads back its JSON (TensorFlow's and torch's thread pools would compete)."""

import argparse
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def runner_arguments(doc):
    """The arguments every runner takes (`--out`, `-k`), with `--out` created."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    return args


def run_suite(test_file, framework, json_path, select=None, keras_backend=None):
    """Runs `test_file` with `--framework framework`, keeping `-k select` tests,
    on `keras_backend` when given (else the environment's).

    Returns:
        The pytest-benchmark JSON as a dict.
    """
    command = [sys.executable, "-m", "pytest", os.path.join(HERE, test_file),
               f"--framework={framework}", f"--benchmark-json={json_path}", "-q",
               "-p", "no:randomly"]
    if select:
        command += ["-k", select]
    env = dict(os.environ, KERAS_BACKEND=keras_backend) if keras_backend else None
    subprocess.run(command, check=True, cwd=os.path.dirname(HERE), env=env)
    with open(json_path) as f:
        return json.load(f)


def machine_facts(runs):
    """The machine facts of the first run, plus each framework's own thread counts
    and BLAS and OpenMP libraries (each process loads its own).

    Args:
        runs: {framework: pytest-benchmark JSON}.
    """
    facts = dict(next(iter(runs.values()))["machine_info"]["facts"])
    facts["by_framework"] = {
        name: {key: run["machine_info"]["facts"][key] for key in ("threads", "blas", "openmp")}
        for name, run in runs.items()}
    return facts


def write_results(out, name, payload, markdown):
    """Writes `payload` to `NAME-YYYY-MM-DD.json` and `markdown` to `.md` under `out`,
    prints the table, and returns the path without its extension (for a chart)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = os.path.join(out, f"{name}-{stamp}")
    with open(stem + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    print(markdown)
    return stem
