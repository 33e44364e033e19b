"""Where the fused layer's CPU time goes, and how close its kernels run to the machine's
peak sgemm.

Runs `test_cpu_breakdown.py` and `test_cpu_gemm.py` in one TensorFlow process (the
layer, its kernels, the per-call overhead outside them; NumPy's and SciPy's GEMMs and
NumPy's peak) and `test_cpu_gemm.py` in a torch process (torch's GEMMs and peak), then
prints and writes `kernel-report.md` and `.json`: the breakdown, with each kernel's
GFLOP/s against the measured peak, and the GEMM rates, with the kernels' time over the
time the fastest library needs for the layer's GEMMs. Every figure comes from one
benchmark: the kernel time in both tables is the breakdown's `kernel` median.

    python benchmarks/kernel_report.py [--out benchmarks/results] [-k EXPR] [--quick]
"""

import json
import os
import tempfile

import machine
from suite import benchmarks, floor_ms, machine_facts, peak_sgemm, run_suite, runner_arguments

OUTSIDE_TARGET_US = 50
GEMMS_BY_MODE = {"fwd": ("projection", "forward"),
                 "train": ("projection", "forward", "backward_dh", "input_grad",
                           "weight_grads")}


def breakdown_rows(runs, peak):
    """Per shape and mode: the layer, the kernels (on all threads and on one), what the
    layer spends outside them, and the kernels' rate against the peak."""
    parts = {}
    for info, stats in benchmarks(runs, "breakdown"):
        name = info["part"] + ("/1" if info.get("threads") == "1thread" else "")
        entry = parts.setdefault((info["shape"], info["mode"]), {"flops": info["flops"]})
        entry[name] = stats["median"] * 1e3
        if info.get("threads") == "all_threads":
            entry["kernel_threads"] = info["thread_count"]
    rows = []
    for (shape, mode), p in sorted(parts.items()):
        row = {"shape": shape, "mode": mode, "flops": p["flops"],
               "layer_ms": p.get("layer"), "kernel_ms": p.get("kernel"),
               "kernel_threads": p.get("kernel_threads"), "kernel_1thread_ms": p.get("kernel/1"),
               "outside_kernel_us": _scaled(p.get("outside_kernel"), 1e3),
               "kernel_gflops": _rate(p["flops"], p.get("kernel")),
               "kernel_1thread_gflops": _rate(p["flops"], p.get("kernel/1")),
               "peak_gflops": peak.get("best"),
               "floor_ms": floor_ms(p["flops"], peak["best"]) if peak else None}
        row["parts_over_layer"] = (
            (row["kernel_ms"] + p["outside_kernel"]) / row["layer_ms"]
            if None not in (row["kernel_ms"], p.get("outside_kernel"), row["layer_ms"]) else None)
        rows.append(row)
    return rows


def _scaled(value, factor):
    return None if value is None else value * factor


def _rate(flops, ms):
    """GFLOP/s of `flops` done in `ms`."""
    return None if ms is None else flops / (ms * 1e-3) / 1e9


def _cell(value, spec):
    return "-" if value is None else format(value, spec)


def breakdown_markdown(rows):
    lines = [f"Median ms. kernel: the drivers on NumPy arrays (all threads; one thread in its "
             f"own column); outside: the layer with the drivers stubbed out, us (target <= "
             f"{OUTSIDE_TARGET_US} us); (kernel + outside) / layer checks that the parts add "
             "up to the layer; GFLOP/s of the layer's FLOPs (2 N T 4H (C + H) forward, 3x "
             "that training) in the kernel's time; floor: those FLOPs at the peak sgemm.", "",
             "| shape | mode | layer | kernel | outside (us) | (kernel + outside) / layer | "
             "kernel GFLOP/s | % of peak | kernel, 1 thread (GFLOP/s) | floor | layer / floor "
             "| outside target |", "|---" * 12 + "|"]
    for r in rows:
        share = (r["kernel_gflops"] / r["peak_gflops"] * 100
                 if r["kernel_gflops"] and r["peak_gflops"] else None)
        one = (f"{r['kernel_1thread_ms']:.2f} ({r['kernel_1thread_gflops']:.0f})"
               if r["kernel_1thread_ms"] is not None else "-")
        over_floor = (r["layer_ms"] / r["floor_ms"]
                      if r["layer_ms"] is not None and r["floor_ms"] else None)
        target = ("-" if r["outside_kernel_us"] is None else
                  "met" if r["outside_kernel_us"] <= OUTSIDE_TARGET_US else
                  f"missed by {r['outside_kernel_us'] - OUTSIDE_TARGET_US:.0f} us")
        lines.append("| " + " | ".join([
            r["shape"], r["mode"], _cell(r["layer_ms"], ".2f"), _cell(r["kernel_ms"], ".2f"),
            _cell(r["outside_kernel_us"], ".0f"), _cell(r["parts_over_layer"], ".2f"),
            _cell(r["kernel_gflops"], ".0f"), _cell(share, ".0f"), one,
            _cell(r["floor_ms"], ".2f"), _cell(over_floor, ".2f"), target]) + " |")
    return "\n".join(lines) + "\n"


def gemm_results(runs):
    """{shape: {(library, threads): {gemm: (ms, GFLOP/s)}}}."""
    gemms = {}
    for info, stats in benchmarks(runs, "gemm"):
        ms = stats["median"] * 1e3
        gemms.setdefault(info["shape"], {}).setdefault(
            (info["library"], info["threads"]), {})[info["gemm"]] = (ms, _rate(info["flops"], ms))
    return gemms


def fastest_gemms(per_library, mode):
    """`(ms, (library, threads))`: the library and thread count doing `mode`'s GEMMs
    soonest, or None without a library that timed them all."""
    totals = {key: sum(g[name][0] for name in GEMMS_BY_MODE[mode])
              for key, g in per_library.items() if all(n in g for n in GEMMS_BY_MODE[mode])}
    if not totals:
        return None
    best = min(totals, key=totals.get)
    return totals[best], best


def gemm_markdown(gemms, rows):
    names = GEMMS_BY_MODE["train"]
    lines = ["Median ms (GFLOP/s) of the GEMMs the layer needs, per library and thread count: "
             "`projection` [N*T, C] @ [C, 4H]; `forward` T x [N, H] @ [H, 4H]; `backward_dh` "
             "T x [N, 4H] @ [4H, H]; `input_grad` [N*T, 4H] @ [4H, C]; `weight_grads` "
             "[C + H, T*N] @ [T*N, 4H].", "",
             "| shape | library | threads | " + " | ".join(names) + " |",
             "|---" * (3 + len(names)) + "|"]
    for shape, per_library in sorted(gemms.items()):
        for (library, threads), g in sorted(per_library.items()):
            cells = [f"{g[n][0]:.3f} ({g[n][1]:.0f})" if n in g else "-" for n in names]
            lines.append(f"| {shape} | {library} | {threads} | " + " | ".join(cells) + " |")
    lines += ["", "The kernels (the breakdown's `kernel`, all threads) over the fastest "
              "library's time for the same GEMMs (fwd: projection + forward; train: all five).",
              "", "| shape | mode | kernel ms | fastest GEMMs ms | library, threads | "
              "kernel / fastest |", "|---" * 6 + "|"]
    for r in rows:
        fastest = fastest_gemms(gemms.get(r["shape"], {}), r["mode"])
        if fastest is None or r["kernel_ms"] is None:
            continue
        best_ms, (library, threads) = fastest
        lines.append(f"| {r['shape']} | {r['mode']} | {r['kernel_ms']:.2f} | {best_ms:.2f} | "
                     f"{library}, {threads} | {r['kernel_ms'] / best_ms:.2f}x |")
    return "\n".join(lines) + "\n"


def peak_markdown(peak):
    if not peak:
        return "Peak sgemm: not timed (deselected).\n"
    rates = ", ".join(f"{name} {rate:.0f}" for name, rate in peak.items() if name != "best")
    return f"Peak sgemm, GFLOP/s on every usable thread: {rates}; best {peak['best']:.0f}.\n"


def main():
    args = runner_arguments(__doc__)
    raw = tempfile.mkdtemp(prefix="fusedlstm-kernel-report-raw-")
    runs = {
        "fusedlstm": run_suite(["test_cpu_breakdown.py", "test_cpu_gemm.py"], "fusedlstm",
                               os.path.join(raw, "fusedlstm.json"), args.select,
                               keras_backend="tensorflow"),
        "torch": run_suite(["test_cpu_gemm.py"], "torch", os.path.join(raw, "torch.json"),
                           args.select, keras_backend="torch"),
    }
    facts = machine_facts(runs)
    peak = peak_sgemm(runs.values())
    rows = breakdown_rows(runs.values(), peak)
    gemms = gemm_results(runs.values())
    markdown = (f"Machine: {machine.summary(facts)}.\n\n"
                f"Threads: {machine.threads_summary(facts)}.\n\n{peak_markdown(peak)}\n"
                f"## Breakdown\n\n{breakdown_markdown(rows)}\n## The GEMMs\n\n"
                f"{gemm_markdown(gemms, rows)}")
    with open(os.path.join(args.out, "kernel-report.json"), "w") as f:
        json.dump({"machine": facts, "peak_sgemm_gflops": peak, "breakdown": rows,
                   "gemm": {s: {f"{lib}/{t}": g for (lib, t), g in per.items()}
                            for s, per in gemms.items()}}, f, indent=1)
    with open(os.path.join(args.out, "kernel-report.md"), "w") as f:
        f.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
