"""One command for a GPU machine: are the CUDA kernels right, and how do they compare with cuDNN?

On the GPU machine (one H200; Python with torch (CUDA), numba, numba-cuda,
llvmlite, scipy, h5py; no Keras, no TensorFlow, no network), from the
repository root, with the wheels of `--download` carried in `.whl/`:

    python benchmarks/gpu_run.py --out OUT

Stages, each in its own process under its own time budget (a stage over its
budget is stopped and reported; the next one runs), 8 minutes in all:

1. install: Keras and what it needs that the image lacks, from `.whl/`
   (`pip install --no-index`), and this package (`pip install --no-deps -e .`).
2. kernel_tests: the GPU tests of tests/test_cuda_kernels.py, unskipped.
3. kernel_checks: the CUDA kernels against `kernels.cpu` on small
   multi-block, one-block and per-step launches with masks and recurrent
   dropout, and on PyTorch tensors against `kernels.cpu` and
   `torch.nn.LSTM` (cuDNN) with the default (persistent) launches.
4. sanitizers: compute-sanitizer memcheck and racecheck on the small
   launches, when the image has compute-sanitizer.
5. layer_checks: `fusedlstm.LSTM(use_fused=True)` on the Keras torch backend
   against `keras.layers.LSTM` (cuDNN where Keras lets it) and its float64
   twin: masks (left-padded, holes), recurrent dropout, go_backwards.
6. timings: forward and a training step at N in {1, 16, 64, 256}, H = C in
   {256, 512, 1024}, T = 100: the fused layer, `keras.layers.LSTM` (cuDNN)
   and `torch.nn.LSTM` (cuDNN), medians of wall times with the device
   synchronized around each run, beside the performance model's prediction
   (`benchmarks/gpu/model.py`) and the model / measured ratio.

Writes `benchmarks/results/gpu-h200.json` and `.md` (copies in OUT too);
`"verified": true` only when a real GPU run passed every check. Everything
else (logs, each stage's JSON) goes under OUT. Prints a summary of at most
12,000 characters.

`--dry-run` runs the same stages on the CPU with the CUDA simulator
(`NUMBA_ENABLE_CUDASIM=1`) and tiny shapes, without installing anything, and
writes the JSON and Markdown to OUT only. `--download` fetches the wheels
into `.whl/` (run it where there is a network).

The kernels and layer code are `benchmarks/gpu/kernels.py` and `layer.py`;
this script only picks, budgets and reports.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / "benchmarks" / "gpu"
RESULTS = ROOT / "benchmarks" / "results"
WHEELS = ROOT / ".whl"
RESULT_NAME = "gpu-h200"
TOTAL_BUDGET_S = 470
SUMMARY_LIMIT = 12000

# Wheels Keras needs that the GPU image lacks (it has numpy, h5py, torch and
# its dependencies), pinned to the versions this repository is tested with.
# `--download` fetches them for CPython 3.11 (and 3.12, in case the image moved
# on), manylinux x86_64: about 16 MiB per Python version.
WHEEL_REQUIREMENTS = (
    "keras==3.15.1", "namex==0.1.0", "optree==0.20.0", "rich==15.0.0", "markdown-it-py==4.3.0",
    "mdurl==0.1.2", "pygments==2.21.0", "ml-dtypes==0.7.0", "absl-py==2.5.1", "packaging==26.4",
)
DOWNLOAD_PYTHONS = ("3.11", "3.12")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64")

# name: (budget in seconds on a GPU, in a dry run)
STAGES = {
    "install": (40, 5),
    "kernel_tests": (100, 60),
    "kernel_checks": (70, 60),
    "sanitizers": (60, 20),
    "layer_checks": (60, 60),
    "timings": (120, 60),
}
# What each stage runs, on the GPU and in the dry run (tiny shapes, few threads).
GPU_TESTS = "test_gpu_kernels_match_cpu or test_gpu_torch_tensors or test_select_kernels"
SIZES = {
    "gpu": dict(
        small=dict(T=3, N=5, H=40),
        kernel_checks=dict(batches=(1, 16, 256), units=(256, 1024), steps=(1, 100)),
        layer_sizes=((16, 100, 256, 256), (3, 7, 5, 31)),
        timed_batches=(1, 16, 64, 256), timed_units=(256, 512, 1024), timed_steps=100,
        warmup=2, repeats=5),
    "dry": dict(
        small=dict(T=2, N=3, H=6),
        kernel_checks=dict(batches=(2,), units=(5,), steps=(3,)),
        layer_sizes=((2, 3, 3, 4),),
        timed_batches=(2,), timed_units=(4,), timed_steps=3,
        warmup=0, repeats=1),
}
# Layer check cases in the dry run (all of them on the GPU).
DRY_LAYER_CASES = ("holes", "recurrent_dropout_left_padded")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=False, default=None,
                        help="folder for the logs, each stage's JSON and copies of the results")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU with the CUDA simulator and tiny shapes; installs "
                             "nothing; results only in --out")
    parser.add_argument("--download", action="store_true",
                        help="download the wheels Keras needs into .whl/ and exit")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S,
                        help="seconds for all stages (default: %(default)s)")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.download and args.out is None:
        parser.error("--out is required")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.download:
        return download_wheels()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        return run_stage(args)
    return orchestrate(args)


# ---------------------------------------------------------------------------
# Wheels.


def download_wheels(dest=WHEELS):
    """`pip download` of `WHEEL_REQUIREMENTS` into `dest`, for each of `DOWNLOAD_PYTHONS`."""
    dest.mkdir(exist_ok=True)
    for version in DOWNLOAD_PYTHONS:
        command = [sys.executable, "-m", "pip", "download", "--dest", str(dest), "--no-deps",
                   "--only-binary=:all:", "--implementation", "cp", "--python-version", version]
        for platform in PLATFORMS:
            command += ["--platform", platform]
        done = subprocess.run(command + list(WHEEL_REQUIREMENTS))
        if done.returncode:
            return done.returncode
    total = sum(path.stat().st_size for path in dest.glob("*.whl"))
    print(f"{dest}: {len(list(dest.glob('*.whl')))} wheels, {total / 2 ** 20:.1f} MiB")
    return 0


# ---------------------------------------------------------------------------
# The orchestrator: each stage in a subprocess under its budget.


def orchestrate(args):
    dry = args.dry_run
    started = time.time()
    deadline = started + args.budget
    env = stage_environment(dry)
    stages = {}
    for name, budgets in STAGES.items():
        budget = budgets[1] if dry else budgets[0]
        left = deadline - time.time()
        if left < 5:
            stages[name] = {"status": "skipped", "reason": "total budget spent"}
            continue
        timeout = min(budget, left)
        stages[name] = run_stage_process(name, args.out, dry, timeout, env)
        print(f"[{time.time() - started:6.1f} s] {name}: {stages[name]['status']}", flush=True)
    report = build_report(stages, dry, time.time() - started)
    write_results(report, args.out, dry)
    print(summary(report, args.out, dry)[-SUMMARY_LIMIT:])
    return 0 if report["all_passed"] else 1


def stage_environment(dry):
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONUNBUFFERED="1",
               FUSEDLSTM_BACKEND_INDEPENDENT_TESTS="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if dry:
        # The fused layer runs the CUDA kernels on CPU tensors, in the simulator.
        env.update(NUMBA_ENABLE_CUDASIM="1", FUSEDLSTM_KERNEL="cuda")
    else:
        env.pop("FUSEDLSTM_KERNEL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_stage_process(name, out, dry, timeout, env):
    """Runs `--stage name`; its JSON (`stage_<name>.json`) with status and seconds added."""
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--out", str(out),
               "--deadline", str(time.time() + timeout - 3)]
    if dry:
        command.append("--dry-run")
    path = out / f"stage_{name}.json"
    path.unlink(missing_ok=True)
    log = out / f"stage_{name}.log"
    started = time.perf_counter()
    with open(log, "w") as stream:
        # Its own process group, so that a stage over budget is stopped with all
        # it started (pytest, compute-sanitizer).
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env,
                                   cwd=ROOT, start_new_session=True)
        try:
            returncode, timed_out = process.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode, timed_out = None, True
    result = json.loads(path.read_text()) if path.exists() else {}
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["returncode"] = returncode
    if timed_out:
        result["status"] = "over budget"
        result["reason"] = f"stopped after {timeout:.0f} s"
    elif result.get("partial", True):  # no JSON, or the stage died before its end
        result["status"] = "failed"
        result["reason"] = f"exit {returncode}: " + tail(log, 1500)
    return result


def tail(path, limit):
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-limit:]


# ---------------------------------------------------------------------------
# Stages (each runs in its own process).


def run_stage(args):
    dry = args.dry_run
    sizes = SIZES["dry" if dry else "gpu"]
    path = args.out / f"stage_{args.stage}.json"

    def save(result):
        path.write_text(json.dumps(result, indent=1, default=str))

    save({"status": "started", "partial": True})
    if args.stage in ("install", "kernel_tests"):
        result = STAGE_FUNCTIONS[args.stage](args, dry)
        result.setdefault("partial", False)
    else:
        sys.path.insert(0, str(GPU_DIR))
        import harness

        harness.use_device("cpu" if dry else "cuda")
        result = STAGE_FUNCTIONS[args.stage](args, dry, sizes, save)
    result.setdefault("partial", False)
    save(result)
    return 0


def stage_install(args, dry):
    if dry:
        return {"status": "skipped", "reason": "dry run: nothing is installed"}
    steps = []
    if not _imports("keras"):
        steps.append(_pip(["install", "--no-index", "--find-links", str(WHEELS), "keras"]))
    if not _imports("fusedlstm.kernels.cuda"):
        steps.append(_pip(["install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)]))
    if not _imports("fusedlstm.kernels.cuda"):
        # Editable install refused (old setuptools): the checkout's own link.
        link = ROOT / "fusedlstm" / "kernels"
        if not link.exists():
            link.symlink_to(Path("..") / "kernels")
            steps.append({"command": f"ln -s ../kernels {link}", "returncode": 0})
    ok = _imports("keras") and _imports("fusedlstm.kernels.cuda")
    return {"status": "passed" if ok else "failed", "steps": steps,
            "keras": _version("keras"), "reason": None if ok else "keras or fusedlstm missing"}


def _imports(module):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                   os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    return done.returncode == 0


def _version(package):
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _pip(arguments):
    """`pip ARGUMENTS`, retried with the options an image may need: a system Python
    marked externally managed, or site-packages the user cannot write."""
    for extra in ([], ["--break-system-packages"], ["--user"],
                  ["--user", "--break-system-packages"]):
        done = subprocess.run([sys.executable, "-m", "pip"] + arguments + extra + ["--quiet"],
                              capture_output=True, text=True)
        if done.returncode == 0:
            break
    return {"command": "pip " + " ".join(arguments + extra), "returncode": done.returncode,
            "output": (done.stdout + done.stderr)[-2000:]}


def stage_kernel_tests(args, dry):
    junit = args.out / "kernel_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_cuda_kernels.py"), "-k", GPU_TESTS,
               f"--junitxml={junit}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    (args.out / "kernel_tests.txt").write_text(done.stdout + done.stderr)
    counts = _junit_counts(junit)
    passed = done.returncode == 0 and counts["failures"] == 0 and counts["errors"] == 0
    if not dry:
        # On the GPU every selected test must run: a skip means no GPU was seen.
        passed = passed and counts["skipped"] == 0 and counts["tests"] > 0
    last = [line for line in done.stdout.splitlines() if line.strip()][-1:]
    return {"status": "passed" if passed else "failed", "counts": counts,
            "pytest_summary": last[0] if last else "", "returncode": done.returncode}


def _junit_counts(path):
    import xml.etree.ElementTree as ElementTree

    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if not path.exists():
        return counts
    root = ElementTree.parse(path).getroot()
    for suite in ([root] if root.tag == "testsuite" else list(root)):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    return counts


def stage_kernel_checks(args, dry, sizes, save):
    import harness
    import kernels as kernel_checks

    launches = kernel_checks.SIMULATOR_LAUNCHES if dry else kernel_checks.SMALL_LAUNCHES
    result = {"status": "started", "partial": True}
    small = kernel_checks.small_check_errors(launches, **sizes["small"])
    result["small"] = small
    save(result)
    rows = _rows_until(args.deadline, result, "torch_rows", save,
                       kernel_checks.run_kernel_checks, **sizes["kernel_checks"])
    small_ok = all(row["max_abs"] <= harness.GRAD_TOL for row in small)
    rows_ok = all(row["passed"] for row in rows)
    result["status"] = ("failed" if not (small_ok and rows_ok) else
                        "over budget" if result.get("over_budget") else "passed")
    result["partial"] = False
    return result


def _rows_until(deadline, result, key, save, function, *args, **kwargs):
    """Runs `function(*args, on_row=..., **kwargs)`, saving its rows so far as
    `result[key]` after each one and stopping it once `deadline` has passed
    (`result["over_budget"]`). Returns the rows."""
    def progress(rows):
        result[key] = list(rows)
        save(result)
        if deadline and time.time() > deadline:
            raise StageOverBudget

    try:
        function(*args, on_row=progress, **kwargs)
    except StageOverBudget:
        result["over_budget"] = True
    return result.get(key, [])


def stage_sanitizers(args, dry, sizes, save):
    import kernels as kernel_checks

    if kernel_checks.find_sanitizer() is None:
        return {"status": "not available", "available": False,
                "reason": "no compute-sanitizer on PATH or in /usr/local/cuda*/bin"}
    budget = max(10.0, (args.deadline or time.time() + 160) - time.time())
    results = kernel_checks.run_sanitizers(args.out, timeout=budget / 2)
    clean = all(results[tool]["returncode"] == 0 for tool in ("memcheck", "racecheck"))
    return {"status": "passed" if clean else "failed", **results}


def stage_layer_checks(args, dry, sizes, save):
    import layer as layer_checks

    stack = layer_checks.import_stack()
    cases = layer_checks.CHECK_CASES
    if dry:
        cases = {name: cases[name] for name in DRY_LAYER_CASES}
    result = {"status": "started", "partial": True}
    rows = _rows_until(args.deadline, result, "rows", save, layer_checks.run_layer_checks,
                       stack, sizes["layer_sizes"], cases)
    ok = bool(rows) and all(row["passed"] for row in rows)
    result["status"] = ("failed" if rows and not ok else
                        "over budget" if result.get("over_budget") or not rows else "passed")
    result["partial"] = False
    return result


def stage_timings(args, dry, sizes, save):
    import layer as layer_checks

    stack = layer_checks.import_stack()
    result = {"status": "started", "partial": True, "rows": [], "skipped": []}
    cells = [(N, H, mode) for H in sizes["timed_units"] for N in sizes["timed_batches"]
             for mode in ("forward", "train")]
    for N, H, mode in cells:
        if args.deadline and time.time() > args.deadline:
            result["skipped"].append({"N": N, "H": H, "mode": mode, "reason": "over budget"})
            continue
        row = layer_checks.time_one(stack, "no_mask", {}, mode, N, H, sizes["warmup"],
                                    sizes["repeats"], steps=sizes["timed_steps"],
                                    torch_lstm=True)
        row.pop("raw_ms")
        result["rows"].append(row)
        save(result)
    result["status"] = "passed" if not result["skipped"] else "over budget"
    result["partial"] = False
    return result


class StageOverBudget(Exception):
    """A stage's deadline passed between two of its items."""


STAGE_FUNCTIONS = {
    "install": stage_install,
    "kernel_tests": stage_kernel_tests,
    "kernel_checks": stage_kernel_checks,
    "sanitizers": stage_sanitizers,
    "layer_checks": stage_layer_checks,
    "timings": stage_timings,
}
CHECK_STAGES = ("kernel_tests", "kernel_checks", "layer_checks")


# ---------------------------------------------------------------------------
# Report: results JSON and Markdown, the model beside the timings, a summary.


def build_report(stages, dry, seconds):
    sys.path.insert(0, str(GPU_DIR))
    checks_passed = all(stages.get(name, {}).get("status") == "passed" for name in CHECK_STAGES)
    sanitizers_ok = stages.get("sanitizers", {}).get("status") in ("passed", "not available")
    report = {
        "kind": "dry run (CPU, CUDA simulator, tiny shapes)" if dry else "GPU measurement",
        "verified": bool(not dry and checks_passed and sanitizers_ok),
        "all_passed": bool(checks_passed and sanitizers_ok),
        "seconds": round(seconds, 1),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - seconds)),
        "environment": _environment(dry),
        "stages": {name: _stage_brief(result) for name, result in stages.items()},
        "checks": {name: stages.get(name) for name in CHECK_STAGES + ("sanitizers",)},
        "timings": with_model(stages.get("timings", {}).get("rows", [])),
        "timings_skipped": stages.get("timings", {}).get("skipped", []),
    }
    return report


def _stage_brief(result):
    brief = {key: result.get(key) for key in ("status", "seconds", "reason") if result.get(key)}
    if "counts" in result:
        brief["counts"] = result["counts"]
    return brief


def _environment(dry):
    info = {"python": sys.version.split()[0], "dry_run": dry}
    try:
        import harness
        import torch

        harness.use_device("cpu" if dry else "cuda")
        info.update(harness.environment(torch))
    except Exception as error:  # the report must still be written
        info["error"] = repr(error)
    return info


def with_model(rows):
    """Each timing row with the model's prediction for its cell and model / measured."""
    try:
        import model

        sass = json.loads(model.DEFAULT_SASS.read_text())
    except (ImportError, OSError, ValueError) as error:
        return [dict(row, model_error=repr(error)) for row in rows]
    out = []
    for row in rows:
        row = dict(row)
        N, H, T = row["N"], row["H"], row["T"]
        try:
            forward = model.fused_forward_us(sass, N, H)[0]
            cudnn = model.cudnn_forward_us(N, H, model.FP32_TFLOPS)
            if row["mode"] == "train":
                forward += model.fused_backward_us(sass, N, H)[0]
                cudnn += model.cudnn_backward_us(N, H, model.FP32_TFLOPS)
        except (ArithmeticError, KeyError, TypeError, ValueError) as error:
            row["model_error"] = repr(error)
            out.append(row)
            continue
        row["model_fused_ms"] = _significant(forward * T / 1000)
        row["model_cudnn_ms"] = _significant(cudnn * T / 1000)
        row["model_over_measured_fused"] = _significant(row["model_fused_ms"] / row["fused_ms"])
        if row.get("torch_lstm_ms"):
            row["model_over_measured_cudnn"] = _significant(row["model_cudnn_ms"]
                                                            / row["torch_lstm_ms"])
        out.append(row)
    return out


def _significant(value, digits=4):
    return float(f"{value:.{digits}g}")


def write_results(report, out, dry):
    text = json.dumps(report, indent=1, default=str) + "\n"
    md = markdown(report)
    targets = [out] if dry else [out, RESULTS]
    for folder in targets:
        (folder / f"{RESULT_NAME}.json").write_text(text)
        (folder / f"{RESULT_NAME}.md").write_text(md)


def markdown(report):
    env = report["environment"]
    lines = [f"# GPU run: {report['kind']}", "",
             f"GPU: {env.get('gpu')}; torch {env.get('torch')}, cuDNN {env.get('cudnn')}, "
             f"keras {env.get('keras')}, numba-cuda {env.get('numba-cuda')}; commit "
             f"{env.get('git_commit')}. Verified: **{report['verified']}** "
             f"({report['seconds']} s).", "", "| stage | status | seconds | note |",
             "|---|---|---|---|"]
    for name, stage in report["stages"].items():
        note = stage.get("counts") or stage.get("reason") or ""
        lines.append(f"| {name} | {stage.get('status')} | {stage.get('seconds', '')} | "
                     f"{str(note)[:120]} |")
    lines += ["", "Milliseconds per call (T as given), medians with the device synchronized "
              "around each run; model = `benchmarks/gpu/model.py` (H100 SXM constants).", "",
              "| mode | N | H | T | fused | keras (stock) | torch.nn.LSTM | model fused | "
              "model/measured fused | model cuDNN | model/measured cuDNN |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["timings"]:
        lines.append(
            f"| {row['mode']} | {row['N']} | {row['H']} | {row['T']} | {row['fused_ms']:.3f} | "
            f"{row['stock_ms']:.3f} ({row['stock_path']}) | {_ms(row.get('torch_lstm_ms'))} | "
            f"{_ms(row.get('model_fused_ms'))} | {row.get('model_over_measured_fused', '-')} | "
            f"{_ms(row.get('model_cudnn_ms'))} | {row.get('model_over_measured_cudnn', '-')} |")
    for cell in report["timings_skipped"]:
        lines.append(f"| {cell['mode']} | {cell['N']} | {cell['H']} | - | skipped: "
                     f"{cell['reason']} | | | | | | |")
    return "\n".join(lines) + "\n"


def _ms(value):
    return "-" if value is None else f"{value:.3f}"


def summary(report, out, dry):
    lines = [f"gpu_run ({report['kind']}): verified={report['verified']} "
             f"all_passed={report['all_passed']} in {report['seconds']} s"]
    for name, stage in report["stages"].items():
        extra = stage.get("counts") or (stage.get("reason") or "")[:300]
        lines.append(f"  {name:14s} {stage.get('status', '?'):12s} {stage.get('seconds', '')} s "
                     f"{extra}")
    checks = report["checks"]
    small = (checks.get("kernel_checks") or {}).get("small", [])
    if small:
        lines.append(f"  small launches: max abs error {max(r['max_abs'] for r in small):.2e} "
                     f"over {len(small)} runs")
    for row in (checks.get("kernel_checks") or {}).get("torch_rows", []):
        if not row["passed"]:
            lines.append(f"  FAILED kernels N={row['N']} H={row['H']} T={row['T']}: "
                         f"cpu {row['cpu_max_abs']} cudnn {row['cudnn_relative']}")
    layer_rows = (checks.get("layer_checks") or {}).get("rows", [])
    if layer_rows:
        failed = [r for r in layer_rows if not r["passed"]]
        lines.append(f"  layer checks: {len(layer_rows) - len(failed)} of {len(layer_rows)} "
                     f"passed; worst fused-stock {max(r['fused_vs_stock'] for r in layer_rows):.2e}")
        lines.extend(f"  FAILED layer {r['case']} N={r['N']} H={r['H']} {r['quantity']} "
                     f"{r['fused_vs_stock']:.2e}" for r in failed[:20])
    lines.append(markdown(report).split("\n\n", 3)[-1])
    written = [str(out / f"{RESULT_NAME}.json")] + ([] if dry else [
        str(RESULTS / f"{RESULT_NAME}.json")])
    lines.append(f"results: {', '.join(written)} (and .md); logs: {out}/stage_*.log")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
