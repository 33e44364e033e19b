"""Runs one pytest-benchmark suite for one framework in a process of its own and
reads back its JSON (TensorFlow's and torch's thread pools would compete)."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_suite(test_file, framework, json_path, select=None):
    """Runs `test_file` with `--framework framework`, keeping `-k select` tests.

    Returns:
        The pytest-benchmark JSON as a dict.
    """
    command = [sys.executable, "-m", "pytest", os.path.join(HERE, test_file),
               f"--framework={framework}", f"--benchmark-json={json_path}", "-q",
               "-p", "no:randomly"]
    if select:
        command += ["-k", select]
    subprocess.run(command, check=True, cwd=os.path.dirname(HERE))
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
