"""Runs the streaming benchmark in ROUNDS rounds, each framework in its own process in
every round, and writes the merged JSON and a Markdown table to `streaming-<date>.json` /
`.md`.

    python benchmarks/run_streaming.py [--out benchmarks/results] [-k EXPR] [--quick]

One process's median moves by 20-40% from run to run on a shared 2-core machine, more
than the layers differ, so the frameworks alternate round by round and the table gives
the median over rounds, and each round's fused / stock ratio.

Target: fusedlstm (`use_fused="auto"`) takes at most the stock layer's time per step.
"""

import os
import statistics

from machine import summary
from suite import machine_facts, run_suite, runner_arguments, write_results

FRAMEWORKS = ("fusedlstm", "keras", "torch")
ROUNDS = 5


def medians_us(runs):
    """{"framework-variant": median microseconds per step} of one round's runs."""
    return {bench["name"]: bench["stats"]["median"] * 1e6
            for run in runs.values() for bench in run["benchmarks"]}


def markdown_table(rounds, facts):
    """The median over `rounds` (a list of `medians_us`) of each layer, and each round's ratio."""
    names = sorted(set().union(*rounds))
    medians = {name: statistics.median(r[name] for r in rounds if name in r) for name in names}
    stock = medians.get("keras-stock")
    lines = [f"Machine: {summary(facts)}.", "",
             "One stateful step per call (N = 1, C = 32, H = 128, T = 1), the state "
             "carried between calls; Keras layers inside a `tf.function`, torch.nn.LSTM "
             f"eager under `inference_mode`. Median of 500 calls per process, microseconds; "
             f"median over {len(rounds)} rounds, each framework in its own process in every "
             "round. Target: fusedlstm-auto / keras-stock <= 1.", "",
             "| layer | us per step | / keras-stock |", "|---|---|---|"]
    for name, value in medians.items():
        ratio = f"{value / stock:.2f}" if stock else "-"
        lines.append(f"| {name} | {value:.0f} | {ratio} |")
    if stock and "fusedlstm-auto" in medians:
        ratios = [r["fusedlstm-auto"] / r["keras-stock"] for r in rounds]
        median = statistics.median(ratios)
        lines += ["", "fusedlstm-auto / keras-stock by round: "
                  + ", ".join(f"{x:.2f}" for x in ratios)
                  + f"; median {median:.2f}: target {'met' if median <= 1 else 'missed'}."]
    return "\n".join(lines) + "\n"


def main():
    args = runner_arguments(__doc__)
    rounds, runs = [], []
    for round_ in range(1 if args.quick else ROUNDS):
        this_round = {name: run_suite(["test_streaming.py"], name,
                                      os.path.join(args.out, f"raw-streaming-{name}.json"),
                                      args.select, keras_backend="tensorflow")
                      for name in FRAMEWORKS}
        rounds.append(medians_us(this_round))
        runs.append(this_round)
    facts = machine_facts(runs[0])
    write_results(args.out, "streaming",
                  {"machine": facts, "medians_us_by_round": rounds,
                   "runs": [list(r.values()) for r in runs]},
                  markdown_table(rounds, facts))

if __name__ == "__main__":
    main()
