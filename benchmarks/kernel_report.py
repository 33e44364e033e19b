"""Where the fused layer's CPU time goes, and how close its kernels run to the
machine's fastest sgemm.

Runs `test_cpu_breakdown.py` (TensorFlow process) and `test_cpu_gemm.py` (one
process for the kernels, NumPy and SciPy, one for torch), then prints and
writes two tables: the per-shape breakdown (framework glue = the layer's time
minus its parts) and the GEMM rates with the kernels' time over the time the
fastest library needs for the same FLOPs (target: 1.3x at S2 and S3).

    python benchmarks/kernel_report.py [--out benchmarks/results] [-k EXPR]
"""

import json
import os

import machine
from suite import machine_facts, run_suite, runner_arguments

GEMM_TARGET = 1.3
GEMMS = ("projection", "forward", "backward_dh", "backward_dx", "weight_grads")
GEMMS_BY_MODE = {"fwd": ("projection", "forward"),
                 "train": ("projection", "forward", "backward_dh", "backward_dx", "weight_grads")}


def medians_ms(run):
    """`[(extra_info, median ms)]`, one per benchmark of a pytest-benchmark JSON."""
    return [(b["extra_info"], b["stats"]["median"] * 1e3) for b in run["benchmarks"]]


def breakdown_rows(run):
    """Per shape and mode: the layer, each part, and the glue, in ms."""
    parts = {}
    for info, ms in medians_ms(run):
        parts.setdefault(info["shape"], {})[(info["mode"], info["part"])] = ms
    rows = []
    for shape, p in sorted(parts.items()):
        def get(mode, name):
            return p.get((mode, name))

        fwd = {"layer": get("fwd", "layer"), "forward": get("fwd", "forward"),
               "cell_math": get("fwd", "cell_math")}
        fwd["glue"] = _minus(fwd["layer"], fwd["forward"])
        train = {"layer": get("train", "layer"), "forward": get("train", "forward"),
                 "cell_math": _plus(get("fwd", "cell_math"),
                                    get("train", "cell_math_backward")),
                 "backward": get("train", "backward")}
        train["glue"] = _minus(train["layer"], train["forward"], train["backward"])
        rows += [(shape, "fwd", fwd), (shape, "train", train)]
    return rows


def _minus(total, *parts):
    if total is None or any(p is None for p in parts):
        return None
    return total - sum(parts)


def _plus(*parts):
    return None if any(p is None for p in parts) else sum(parts)


BREAKDOWN_COLUMNS = ("layer", "forward", "cell_math", "backward", "glue")


def breakdown_markdown(rows):
    lines = ["Median ms. The layer's time = forward kernel (the input projection "
             "included) (+ backward kernel, the input and weight gradients included, when "
             "training) + glue; cell math is part of the kernels (timed alone, one "
             "thread).", "",
             "| shape | mode | " + " | ".join(BREAKDOWN_COLUMNS) + " |",
             "|---|---|" + "---|" * len(BREAKDOWN_COLUMNS)]
    for shape, mode, row in rows:
        cells = ["-" if row.get(c) is None else f"{row[c]:.2f}" for c in BREAKDOWN_COLUMNS]
        lines.append(f"| {shape} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gemm_results(runs):
    """`(gemms, kernels)`: {shape: {(library, threads): {gemm: (ms, GFLOP/s)}}} and
    {shape: {(mode, threads): ms}}."""
    gemms, kernels = {}, {}
    for run in runs:
        for info, ms in medians_ms(run):
            if info["kind"] == "gemm":
                per = gemms.setdefault(info["shape"], {}).setdefault(
                    (info["library"], info["threads"]), {})
                per[info["gemm"]] = (ms, info["flops"] / (ms * 1e-3) / 1e9)
            else:
                kernels.setdefault(info["shape"], {})[(info["mode"], info["threads"])] = ms
    return gemms, kernels


def fastest_gemm(per_library, mode):
    """`(ms, (library, threads))`: the library and thread count doing `mode`'s GEMMs soonest."""
    totals = {key: sum(g[name][0] for name in GEMMS_BY_MODE[mode])
              for key, g in per_library.items() if all(n in g for n in GEMMS_BY_MODE[mode])}
    best = min(totals, key=totals.get)
    return totals[best], best


def gemm_markdown(gemms, kernels):
    lines = ["Median ms (GFLOP/s) of the GEMMs the layer needs, per library and thread "
             "count: `projection` = [N*T, C] @ [C, 4H]; `forward` = T x [N, H] @ [H, 4H]; "
             "`backward_dh` = T x [N, 4H] @ [4H, H]; `backward_dx` = [N*T, 4H] @ [4H, C]; "
             "`weight_grads` = [C + H, T*N] @ [T*N, 4H].", "",
             "| shape | library | threads | " + " | ".join(GEMMS) + " |",
             "|---|---|---|" + "---|" * len(GEMMS)]
    for shape, per_library in sorted(gemms.items()):
        for (library, threads), g in sorted(per_library.items()):
            cells = [f"{g[n][0]:.3f} ({g[n][1]:.0f})" if n in g else "-"
                     for n in GEMMS]
            lines.append(f"| {shape} | {library} | {threads} | " + " | ".join(cells) + " |")
    lines += ["", "The kernels' own time (fwd: `forward`; train: `forward` with saving + "
              f"`backward`) over the fastest library's time for the same GEMMs (fwd: "
              f"{', '.join(GEMMS_BY_MODE['fwd'])}; train: all) "
              f"(target <= {GEMM_TARGET}x at S2 and S3).", "",
              "| shape | mode | kernel threads | kernel ms | fastest GEMMs ms | library, threads "
              "| kernel / fastest | target |",
              "|---|---|---|---|---|---|---|---|"]
    for shape, per_mode in sorted(kernels.items()):
        for (mode, threads), ms in sorted(per_mode.items()):
            if shape not in gemms:
                continue
            best_ms, (library, best_threads) = fastest_gemm(gemms[shape], mode)
            ratio = ms / best_ms
            target = "-" if shape == "S1" else (
                "met" if ratio <= GEMM_TARGET else f"missed by {ratio / GEMM_TARGET:.2f}x")
            lines.append(f"| {shape} | {mode} | {threads} | {ms:.2f} | {best_ms:.2f} | "
                         f"{library}, {best_threads} | {ratio:.2f}x | {target} |")
    return "\n".join(lines) + "\n"


def main():
    args = runner_arguments(__doc__)
    runs = {
        "breakdown": run_suite("test_cpu_breakdown.py", "fusedlstm",
                               os.path.join(args.out, "raw-breakdown.json"), args.select),
        "gemm-fusedlstm": run_suite("test_cpu_gemm.py", "fusedlstm",
                                    os.path.join(args.out, "raw-gemm-fusedlstm.json"),
                                    args.select),
        "gemm-torch": run_suite("test_cpu_gemm.py", "torch",
                                os.path.join(args.out, "raw-gemm-torch.json"), args.select),
    }
    facts = machine_facts(runs)
    rows = breakdown_rows(runs["breakdown"])
    gemms, kernels = gemm_results([runs["gemm-fusedlstm"], runs["gemm-torch"]])
    markdown = (f"Machine: {machine.summary(facts)}.\n\n"
                f"Threads: {machine.threads_summary(facts)}.\n\n## Breakdown\n\n"
                f"{breakdown_markdown(rows)}\n## Kernels against sgemm\n\n"
                f"{gemm_markdown(gemms, kernels)}")
    with open(os.path.join(args.out, "kernel-report.json"), "w") as f:
        json.dump({"machine": facts,
                   "breakdown_ms": [{"shape": s, "mode": m, **row} for s, m, row in rows],
                   "gemm": {s: {f"{lib}/{t}": g for (lib, t), g in per.items()}
                            for s, per in gemms.items()},
                   "kernel_ms": {s: {f"{m}/{t}": ms for (m, t), ms in per.items()}
                                 for s, per in kernels.items()}}, f, indent=1)
    with open(os.path.join(args.out, "kernel-report.md"), "w") as f:
        f.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
