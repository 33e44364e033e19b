"""Runs the JAX benchmark once per layer, each in its own process, and writes
the merged JSON and a Markdown table to `jax-<date>.json` / `.md`.

    python benchmarks/run_jax.py [--out benchmarks/results] [-k EXPR]
"""

import os

from machine import summary
from run_cpu import medians_ms
from suite import run_suite, runner_arguments, write_results

FRAMEWORKS = ("fusedlstm", "keras")


def markdown_table(table, machine):
    lines = [f"Machine: {machine}. Keras JAX backend, both layers under `jax.jit`. "
             "Median of 7 runs, ms; fused / stock below 1: fusedlstm is faster.", "",
             "| shape | mode | case | fusedlstm | keras.layers.LSTM | fused / stock |",
             "|---|---|---|---|---|---|"]
    for (shape, mode, case), row in sorted(table.items()):
        fused, stock = row.get("fusedlstm"), row.get("keras")
        ratio = f"{fused / stock:.2f}x" if fused and stock else "-"
        lines.append(f"| {shape} | {mode} | {case} | {fused:.2f} | {stock:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main():
    args = runner_arguments(__doc__)
    runs = [run_suite("test_jax_lstm.py", name, os.path.join(args.out, f"raw-jax-{name}.json"),
                      args.select, keras_backend="jax")
            for name in FRAMEWORKS]
    facts = runs[0]["machine_info"]["facts"]
    extra = runs[0]["benchmarks"][0]["extra_info"]
    machine = f"{summary(facts)}, jax {extra['jax']}"
    table = medians_ms(runs)
    write_results(args.out, "jax",
                  {"machine": machine, "medians_ms": {"/".join(k): v for k, v in table.items()},
                   "runs": runs},
                  markdown_table(table, machine))

if __name__ == "__main__":
    main()
