"""Runs the streaming benchmark once per framework, each in its own process, and
writes the merged JSON and a Markdown table to `streaming-<date>.json` / `.md`.

    python benchmarks/run_streaming.py [--out benchmarks/results] [-k EXPR]

Target: fusedlstm (`use_fused="auto"`) takes at most the stock layer's time per step.
"""

import os

from machine import summary
from suite import machine_facts, run_suite, runner_arguments, write_results

FRAMEWORKS = ("fusedlstm", "keras", "torch")


def medians_us(runs):
    """{"framework-variant": median microseconds per step}."""
    return {bench["name"]: bench["stats"]["median"] * 1e6
            for run in runs.values() for bench in run["benchmarks"]}


def markdown_table(medians, facts):
    stock = medians.get("keras-stock")
    lines = [f"Machine: {summary(facts)}.", "",
             "One stateful step per call (N = 1, C = 32, H = 128, T = 1), the state "
             "carried between calls; Keras layers inside a `tf.function`, torch.nn.LSTM "
             "eager under `inference_mode`. Median of 500 calls, microseconds. Target: "
             "fusedlstm-auto / keras-stock <= 1.", "",
             "| layer | us per step | / keras-stock |", "|---|---|---|"]
    for name, value in sorted(medians.items()):
        ratio = f"{value / stock:.2f}" if stock else "-"
        lines.append(f"| {name} | {value:.0f} | {ratio} |")
    if stock and "fusedlstm-auto" in medians:
        met = medians["fusedlstm-auto"] <= stock
        lines += ["", f"Target {'met' if met else 'missed'}: fusedlstm-auto "
                      f"{medians['fusedlstm-auto']:.0f} us, keras-stock {stock:.0f} us."]
    return "\n".join(lines) + "\n"


def main():
    args = runner_arguments(__doc__)
    runs = {name: run_suite("test_streaming.py", name,
                            os.path.join(args.out, f"raw-streaming-{name}.json"), args.select,
                            keras_backend="tensorflow")
            for name in FRAMEWORKS}
    facts = machine_facts(runs)
    medians = medians_us(runs)
    write_results(args.out, "streaming",
                  {"machine": facts, "medians_us": medians, "runs": list(runs.values())},
                  markdown_table(medians, facts))

if __name__ == "__main__":
    main()
