import os
import subprocess
import sys

import pytest

import machine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FRAMEWORKS = ("fusedlstm", "keras", "torch", "onnxruntime")

# Spins until stopped or until the process that started it is gone, so that it
# can never outlive the benchmark.
SPINNER = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
parent = os.getppid()
while os.getppid() == parent:
    pass
"""


def pytest_addoption(parser):
    parser.addoption("--framework", choices=FRAMEWORKS, default="fusedlstm",
                     help="the one implementation this process times (the Keras layers on "
                          "KERAS_BACKEND's backend)")


@pytest.fixture(scope="session")
def framework(request):
    return request.config.getoption("--framework")


@pytest.fixture
def busy_core():
    """Keeps the last usable core busy with another process for the test's duration.

    Yields:
        The number of the busy core.
    """
    core = max(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", SPINNER, str(core)])
    try:
        yield core
    finally:
        spinner.terminate()
        spinner.wait()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Every result file names the CPU, its flags, library versions, threads and BLAS."""
    machine_info["facts"] = machine.describe()
