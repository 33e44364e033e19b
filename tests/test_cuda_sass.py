"""The CUDA kernels compiled offline to SASS for sm_90: no GPU needed.

Every kernel of `kernels.cuda.SIGNATURES` goes through numba-cuda (PTX),
`ptxas`, `nvlink` (with `libcudadevrt.a` for the grid barrier) and `nvdisasm`,
from NVIDIA's CUDA wheels (`pip install -e ".[sass]"`); `benchmarks/gpu/sass.py`
reads the result. Skipped, with the reason, when those wheels are absent.
"""

import pathlib
import sys

import pytest
from numba import config

from fusedlstm.kernels import cuda as cuda_kernels
from fusedlstm.kernels.cuda.launch import LAUNCH_BOUNDS

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"))
import sass  # noqa: E402

BACKEND_INDEPENDENT = True  # see conftest.py

if config.ENABLE_CUDASIM:
    pytest.skip("the CUDA simulator compiles no PTX", allow_module_level=True)
try:
    for _tool in ("ptxas", "nvlink", "nvdisasm", "libcudadevrt.a"):
        sass.find_tool(_tool)
except sass.ToolMissing as missing:
    pytest.skip(str(missing), allow_module_level=True)

KERNELS = sorted(sass.report_keys(cuda_kernels.SIGNATURES))
# The LSTM kernels: those with inner products (the others move data).
LSTM_KERNELS = [name for name in KERNELS if name.startswith("lstm_")]
# What `LAUNCH_BOUNDS` promises the cooperative launcher: this many threads
# and blocks per SM on an H100 (64K registers, 228 KB shared memory per SM).
THREADS, BLOCKS_PER_SM = LAUNCH_BOUNDS
REGISTERS_PER_SM = 64 * 1024
SHARED_BYTES_PER_SM = 228 * 1024
MIN_FFMA_SHARE = 0.5


@pytest.fixture(scope="module")
def reports():
    return sass.report()["kernels"]


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles_and_links_for_sm90(reports, name):
    entry = reports[name]
    assert entry["instructions"] > 0
    assert entry["linked_cg_runtime"] == ("_persistent" in name)


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_has_no_float64(reports, name):
    assert reports[name]["float64_instructions"] == 0


# Spill instructions per trip that ptxas leaves in the backward kernels' streamed
# product loop (weights read through L2), explained in the report's spill_notes.
BACKWARD_STREAMED_SPILLS = 4


@pytest.mark.parametrize("name", LSTM_KERNELS)
def test_inner_products_use_no_local_memory(reports, name):
    entry = reports[name]
    assert entry["hot_loop"] is not None, entry["innermost_loops"]
    assert entry["hot_loop"]["local_memory"] == 0, entry["hot_loop"]
    streamed = entry["streamed_loop"]
    assert streamed is not None, entry["innermost_loops"]
    allowed = BACKWARD_STREAMED_SPILLS if "backward" in name else 0
    assert streamed["local_memory"] <= allowed, streamed


@pytest.mark.parametrize("name", KERNELS)
def test_resources_fit_the_launch_bounds(reports, name):
    entry = reports[name]
    assert entry["linked_registers"] * THREADS * BLOCKS_PER_SM <= REGISTERS_PER_SM
    assert entry["shared_bytes"] * BLOCKS_PER_SM <= SHARED_BYTES_PER_SM


def test_every_lstm_kernel_is_checked_dropout_builds_included():
    assert {name for name in LSTM_KERNELS if name.endswith("_dropout")} == {
        "lstm_forward_persistent_dropout", "lstm_backward_persistent_dropout"}
    assert len(LSTM_KERNELS) == 8


@pytest.mark.parametrize("name", LSTM_KERNELS)
def test_hot_loop_is_mostly_ffma(reports, name):
    hot = reports[name]["hot_loop"]
    assert hot is not None, reports[name]["innermost_loops"]
    assert hot["ffma_share"] >= MIN_FFMA_SHARE, hot


def test_ptxas_resource_lines_are_parsed():
    text = ("ptxas info    : Function properties for k\n"
            "    16 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads\n"
            "ptxas info    : Used 128 registers, used 1 barriers")
    assert sass.parse_ptxas_resources(text) == {
        "registers": 128, "spill_store_bytes": 16, "spill_load_bytes": 24,
        "stack_frame_bytes": 16}


def test_nvlink_resource_lines_are_parsed_for_the_named_kernel():
    text = ("nvlink info    : Function properties for 'cudaCGSynchronize':\n"
            "nvlink info    : used 16 registers, used 1 barriers, 0 stack, 3080 bytes smem, "
            "656 bytes cmem[0], 0 bytes lmem\n"
            "nvlink info    : Function properties for '_ZN6kernel3fwdE':\n"
            "nvlink info    : used 120 registers, used 1 barriers, 64 stack, 49152 bytes smem, "
            "1656 bytes cmem[0], 0 bytes lmem")
    assert sass.parse_nvlink_resources(text, "fwd") == {
        "linked_registers": 120, "linked_stack_bytes": 64, "shared_bytes": 49152,
        "local_bytes": 0}


def test_loops_are_found_from_backward_branches():
    code = [(0, None, "MOV R1, RZ"), (16, ".L_x_1", "FFMA R2, R3, R4, R2"),
            (32, ".L_x_2", "LDS R3, [R5]"), (48, None, "FFMA R2, R3, R3, R2"),
            (64, None, "@!P0 BRA `(.L_x_2)"), (80, None, "@P1 BRA `(.L_x_1)"),
            (96, None, "EXIT")]
    loops = sass.find_loops(code)
    assert sorted(loops) == [(1, 5), (2, 4)]
    assert sass.innermost(loops) == [(2, 4)]
    stats = sass.loop_stats(code, 2, 4)
    assert (stats["instructions"], stats["ffma"], stats["shared_loads"]) == (3, 1, 1)
