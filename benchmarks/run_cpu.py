"""Runs the CPU benchmark once per framework, each in its own process, and
writes the merged JSON, a Markdown table and a PNG chart.

    python benchmarks/run_cpu.py [--out benchmarks/results] [-k EXPR]
"""

import os

import machine
from suite import machine_facts, run_suite, runner_arguments, write_results

FRAMEWORKS = ("fusedlstm", "keras", "torch")
# Cases where the stock layer leaves its fast path: the fused layer must take at
# most this fraction of its time at S2.
SLOW_PATH_CASES = ("mask_left", "mask_holes", "recurrent_dropout")
SLOW_PATH_TARGET = 0.5


def medians_ms(runs):
    """{(shape, mode, case): {framework: median ms}} from pytest-benchmark JSONs."""
    table = {}
    for run in runs:
        for bench in run["benchmarks"]:
            info = bench["extra_info"]
            key = (info["shape"], info["mode"], info["case"])
            table.setdefault(key, {})[info["framework"]] = bench["stats"]["median"] * 1e3
    return table


def targets(shape, case):
    """{other framework: the largest fused / other time ratio allowed} for one row."""
    limits = {"keras": SLOW_PATH_TARGET if shape == "S2" and case in SLOW_PATH_CASES else 1.0}
    if case == "plain":
        limits["torch"] = 1.0
    return limits


def target_status(row, shape, case):
    """"met", or what was missed and by how much; "-" without the times to judge."""
    fused = row.get("fusedlstm")
    missed = []
    for other, limit in targets(shape, case).items():
        if fused is None or other not in row:
            return "-"
        ratio = fused / row[other]
        if ratio > limit:
            missed.append(f"fused / {other} {ratio:.2f} > {limit:g}")
    return "missed: " + "; ".join(missed) if missed else "met"


def markdown_table(table, facts):
    lines = [f"Machine: {machine.summary(facts)}.", "",
             f"Threads: {machine.threads_summary(facts)}.", "",
             "Median of 7 runs, ms; ratios are fused time / other time (below 1: fusedlstm "
             "is faster). Targets: fused / keras <= 1 everywhere and <= "
             f"{SLOW_PATH_TARGET:g} for the masked and recurrent-dropout cases at S2; fused / "
             "torch <= 1; busy_core: S2 with another process spinning on one core.", "",
             "| shape | mode | case | fusedlstm | keras.layers.LSTM | torch.nn.LSTM | "
             "fused / keras | fused / torch | targets |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (shape, mode, case), row in sorted(table.items()):
        fused = row.get("fusedlstm")

        def cell(name):
            return f"{row[name]:.2f}" if name in row else "-"

        def ratio(name):
            return f"{fused / row[name]:.2f}" if name in row and fused else "-"

        lines.append(f"| {shape} | {mode} | {case} | {cell('fusedlstm')} | {cell('keras')} | "
                     f"{cell('torch')} | {ratio('keras')} | {ratio('torch')} | "
                     f"{target_status(row, shape, case)} |")
    return "\n".join(lines) + "\n"


def chart(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k in table if k[2] == "plain")
    labels = [f"{s} {m}" for s, m, _ in keys]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.27
    for offset, name in enumerate(FRAMEWORKS):
        values = [table[k].get(name, 0) for k in keys]
        ax.bar([i + (offset - 1) * width for i in range(len(keys))], values, width, label=name)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median, log scale)")
    ax.set_xticks(range(len(keys)), labels)
    ax.set_title("LSTM on the CPU: fusedlstm vs keras.layers.LSTM vs torch.nn.LSTM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    args = runner_arguments(__doc__)
    runs = {name: run_suite("test_cpu_lstm.py", name,
                            os.path.join(args.out, f"raw-{name}.json"), args.select)
            for name in FRAMEWORKS}
    facts = machine_facts(runs)
    table = medians_ms(runs.values())
    stem = write_results(
        args.out, "cpu",
        {"machine": facts, "medians_ms": {"/".join(k): v for k, v in table.items()},
         "runs": list(runs.values())},
        markdown_table(table, facts))
    chart(table, stem + ".png")

if __name__ == "__main__":
    main()
