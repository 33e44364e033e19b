"""Runs the CPU benchmark once per framework, each in its own process, and
writes the merged JSON, a Markdown table and a PNG chart.

    python benchmarks/run_cpu.py [--out benchmarks/results] [-k EXPR]
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FRAMEWORKS = ("fusedlstm", "keras", "torch")


def run_framework(framework, out_dir, select):
    path = os.path.join(out_dir, f"raw-{framework}.json")
    command = [sys.executable, "-m", "pytest", os.path.join(HERE, "test_cpu_lstm.py"),
               f"--framework={framework}", f"--benchmark-json={path}", "-q", "-p", "no:randomly"]
    if select:
        command += ["-k", select]
    subprocess.run(command, check=True, cwd=os.path.dirname(HERE))
    with open(path) as f:
        return json.load(f)


def medians_ms(runs):
    """{(shape, mode, case): {framework: median ms}} from pytest-benchmark JSONs."""
    table = {}
    for run in runs:
        for bench in run["benchmarks"]:
            info = bench["extra_info"]
            key = (info["shape"], info["mode"], info["case"])
            table.setdefault(key, {"floor": info["gemm_floor_ms"]})
            table[key][info["framework"]] = bench["stats"]["median"] * 1e3
    return table


def markdown_table(table, machine):
    lines = [f"Machine: {machine}. Median of 7 runs, ms; ratios are time / fusedlstm time "
             "(above 1: fusedlstm is faster).", "",
             "| shape | mode | case | fusedlstm | keras.layers.LSTM | torch.nn.LSTM | "
             "keras / fused | torch / fused | fused / GEMM floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (shape, mode, case), row in sorted(table.items()):
        fused = row.get("fusedlstm")

        def cell(name):
            return f"{row[name]:.2f}" if name in row else "-"

        def ratio(name):
            return f"{row[name] / fused:.2f}x" if name in row and fused else "-"

        floor = f"{fused / row['floor']:.2f}x" if fused else "-"
        lines.append(f"| {shape} | {mode} | {case} | {cell('fusedlstm')} | {cell('keras')} | "
                     f"{cell('torch')} | {ratio('keras')} | {ratio('torch')} | {floor} |")
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    runs = [run_framework(name, args.out, args.select) for name in FRAMEWORKS]
    info = runs[0]["machine_info"]
    machine = (f"{info.get('cpu', {}).get('brand_raw', info['processor'])}, "
               f"{info['cores']} cores, Python {info['python']}, NumPy {info['numpy']}, "
               f"Numba {info['numba']}")
    versions = {k: v for run in runs for b in run["benchmarks"][:1]
                for k, v in b["extra_info"].items() if k in ("keras", "tensorflow", "torch")}
    machine += ", " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
    table = medians_ms(runs)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    with open(os.path.join(args.out, f"cpu-{stamp}.json"), "w") as f:
        json.dump({"machine": machine, "medians_ms": {"/".join(k): v for k, v in table.items()},
                   "runs": runs}, f, indent=1)
    markdown = markdown_table(table, machine)
    with open(os.path.join(args.out, f"cpu-{stamp}.md"), "w") as f:
        f.write(markdown)
    chart(table, os.path.join(args.out, f"cpu-{stamp}.png"))
    print(markdown)


if __name__ == "__main__":
    main()
