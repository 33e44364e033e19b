import os
import platform

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FRAMEWORKS = ("fusedlstm", "keras", "torch")


def pytest_addoption(parser):
    parser.addoption("--framework", choices=FRAMEWORKS, default="fusedlstm",
                     help="the one framework this process times")


@pytest.fixture
def framework(request):
    return request.config.getoption("--framework")


def pytest_benchmark_update_machine_info(config, machine_info):
    import numba
    import numpy

    machine_info["cores"] = os.cpu_count()
    machine_info["python"] = platform.python_version()
    machine_info["numpy"] = numpy.__version__
    machine_info["numba"] = numba.__version__
