"""The facts every CPU result file names: the CPU model and its vector flags, the
cores, library versions, thread counts and the BLAS libraries in use.

Speed differs by CPU and by BLAS (see DESIGN.md, CPU facts): a figure without
them cannot be compared with another machine's. Call `describe()` after the
frameworks a benchmark uses are imported, so that their libraries are seen.
"""

import importlib.metadata
import os
import platform
import re
import subprocess
import sys

import threadpoolctl

DISTRIBUTIONS = ("numpy", "scipy", "numba", "llvmlite", "threadpoolctl", "keras",
                 "tensorflow-cpu", "tensorflow", "torch", "jax", "jaxlib", "onnx", "onnxruntime",
                 "pytest-benchmark")
# Vector extensions that decide which GEMM and gate-math code paths a CPU gets.
VECTOR_FLAG = re.compile(r"^(avx2|fma|avx_vnni|avx512.*|amx.*)$")
# Variables that change threading, BLAS kernels or the frameworks' CPU paths.
ENVIRONMENT = re.compile(
    r"^(OPENBLAS_|MKL_|OMP_|KMP_|GOMP_|NUMBA_|TF_ENABLE_ONEDNN_OPTS$|TF_NUM_|KERAS_BACKEND$)")


def describe():
    """All the facts, as a JSON-serializable dict."""
    return {
        "cpu_model": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu": cpu_identity(),
        "cpu_vector_flags": cpu_vector_flags(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "versions": library_versions(),
        "threads": thread_counts(),
        "blas": blas_libraries(),
        "openmp": openmp_runtimes(),
        "environment": {k: v for k, v in sorted(os.environ.items()) if ENVIRONMENT.match(k)},
    }


def summary(facts):
    """One line for a Markdown report: CPU, flags, cores, BLAS and versions."""
    avx512 = [f for f in facts["cpu_vector_flags"] if f.startswith(("avx512", "amx"))]
    blas = "; ".join(
        f"{b['internal_api']} {b['version']} ({b['architecture']}, {b['threading_layer']}, "
        f"{b['num_threads']} threads, {b['library']})" for b in facts["blas"])
    versions = ", ".join(f"{k} {v}" for k, v in facts["versions"].items())
    env = ", ".join(f"{k}={v}" for k, v in facts["environment"].items()
                    if k.startswith("OPENBLAS_")) or "no OPENBLAS_* variables"
    return (f"{facts['cpu_model']} ({facts['cpu_id']}), {facts['cpus_usable']} cores, "
            f"AVX-512/AMX flags: {' '.join(avx512) or 'none'}; BLAS: {blas or 'none loaded'}; "
            f"{env}; Python {facts['python']}, {versions}")


def threads_summary(facts):
    """One line per process: its threads and the BLAS it links itself."""
    lines = []
    for name, own in facts.get("by_process", {}).items():
        threads = dict(own["threads"])
        torch_blas = threads.pop("torch_blas", None)
        if torch_blas:
            threads["torch BLAS"] = torch_blas["blas"] + (" + oneDNN" if torch_blas["onednn"]
                                                          else "")
        lines.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in threads.items()))
    return "; ".join(lines)


def cpu_model():
    """`lscpu`'s model name, else /proc/cpuinfo's, else the platform's."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
        if found:
            return found.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    found = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    return found.group(1).strip() if found else platform.processor()


def cpu_id():
    """Vendor, family, model and stepping: virtual machines often report a model name
    as bare as "AMD EPYC", and these still tell the CPU generations apart."""
    cpu = cpu_identity()
    return (f"{cpu['vendor_id']} family {cpu['family']} model {cpu['model']} "
            f"stepping {cpu['stepping']}")


def cpu_identity():
    """/proc/cpuinfo's vendor_id, cpu family, model, stepping and model name; on Arm its
    CPU implementer, architecture, part and variant in their places; "?" where it has none."""
    info = _cpuinfo()

    def field(*names):
        for name in names:
            found = re.search(rf"^{name}\s*:\s*(.+)$", info, re.MULTILINE)
            if found:
                return found.group(1).strip()
        return "?"

    return {"vendor_id": field("vendor_id", "CPU implementer"),
            "family": field("cpu family", "CPU architecture"),
            "model": field("model", "CPU part"), "stepping": field("stepping", "CPU variant"),
            "model_name": field("model name") if "model name" in info else cpu_model()}


def cpu_file_stem(cpu):
    """`cpu-<vendor>-<family>-<model>`, e.g. cpu-amd-25-17 for an AuthenticAMD family 25
    model 17: the name of one CPU model's result files."""
    vendor = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(
        cpu["vendor_id"], re.sub(r"[^a-z0-9]+", "", cpu["vendor_id"].lower()) or "unknown")
    return "-".join(["cpu", vendor] + [re.sub(r"[^A-Za-z0-9]+", "", cpu[key]) or "unknown"
                                      for key in ("family", "model")])


def cpu_vector_flags():
    """The AVX2, FMA, AVX-512 and AMX flags the CPU reports, sorted."""
    found = re.search(r"^flags\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    flags = found.group(1).split() if found else []
    return sorted(f for f in set(flags) if VECTOR_FLAG.match(f))


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def library_versions():
    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def thread_counts():
    """Threads each loaded runtime will use: Numba's, and torch's or TensorFlow's."""
    threads = {}
    if "numba" in sys.modules:
        import numba

        threads["numba"] = numba.get_num_threads()
        threads["numba_threading_layer"] = _numba_threading_layer(numba)
    if "torch" in sys.modules:
        import torch

        threads["torch_intra_op"] = torch.get_num_threads()
        threads["torch_inter_op"] = torch.get_num_interop_threads()
        threads["torch_blas"] = _torch_blas(torch)
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        # 0 means TensorFlow sizes the pool to the cores.
        threads["tensorflow_intra_op"] = tf.config.threading.get_intra_op_parallelism_threads()
        threads["tensorflow_inter_op"] = tf.config.threading.get_inter_op_parallelism_threads()
    return threads


def _numba_threading_layer(numba):
    try:
        return numba.threading_layer()
    except ValueError:
        return f"not started (configured: {numba.config.THREADING_LAYER})"


def _torch_blas(torch):
    """torch's BLAS and whether oneDNN (mkldnn) is built in, from its build config."""
    found = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return {"blas": found.group(1) if found else "unknown",
            "onednn": torch.backends.mkldnn.is_available()}


def blas_libraries():
    """threadpoolctl's view of every BLAS and OpenMP runtime loaded in this process."""
    return [{"user_api": info["user_api"], "internal_api": info["internal_api"],
             "version": info.get("version"), "threading_layer": info.get("threading_layer"),
             "architecture": info.get("architecture"), "num_threads": info["num_threads"],
             "library": os.path.basename(info["filepath"])}
            for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]


def openmp_runtimes():
    return [{"internal_api": info["internal_api"], "version": info.get("version"),
             "num_threads": info["num_threads"], "library": os.path.basename(info["filepath"])}
            for info in threadpoolctl.threadpool_info() if info["user_api"] == "openmp"]
