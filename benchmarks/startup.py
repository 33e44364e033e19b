"""Start-up cost: the first forward + backward in a fresh process, of the fused
layer with the compiled-kernel cache empty (cold) and filled (warm), and of the
stock layer, with the fused / stock ratios (targets: cold <= 2x, warm <= 1.5x).

Each child process imports the framework (timed apart), builds the layer, then
times its first and second training step (forward and gradients of the
weights), so the first minus the second is what JIT compilation or cache loading
adds.

    python benchmarks/startup.py [--out benchmarks/results]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import machine

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = {"cold": 2.0, "warm": 1.5}

CHILD = """
import json, sys, time
sys.path.insert(0, {here!r})
start = time.perf_counter()
import numpy as np, tensorflow as tf, keras
if {fused}:
    import fusedlstm
    layer_class = fusedlstm.LSTM
else:
    layer_class = keras.layers.LSTM
import_s = time.perf_counter() - start
import machine
layer = layer_class(32, return_sequences=True)
x = tf.constant(np.random.default_rng(0).normal(size=(4, 20, 8)).astype("float32"))
layer.build(x.shape)

def step():
    start = time.perf_counter()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True))
    tape.gradient(loss, layer.trainable_weights)[0].numpy()
    return time.perf_counter() - start

first, second = step(), step()
print(json.dumps({{"import_s": import_s, "first_s": first, "second_s": second,
                  "facts": machine.describe()}}))
"""


def first_call(fused, cache_dir):
    """Times of a fresh process's import, first and second step; its stderr lines
    naming fusedlstm (what it says while compiling)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", CHILD.format(here=HERE, fused=fused)],
                          env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["added_s"] = result["first_s"] - result["second_s"]
    result["stderr_fusedlstm"] = [line for line in done.stderr.splitlines()
                                  if "fusedlstm" in line.lower()]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        runs = {"stock": first_call(False, cache_dir),
                "cold": first_call(True, cache_dir),
                "warm": first_call(True, cache_dir)}
    facts = runs["cold"]["facts"]
    for run in runs.values():
        del run["facts"]
    stock_first = runs["stock"]["first_s"]
    ratios = {name: runs[name]["first_s"] / stock_first for name in TARGETS}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "startup.json"), "w") as f:
        json.dump({"machine": facts, "runs": runs, "fused_over_stock_first_call": ratios,
                   "targets": TARGETS}, f, indent=1)
    print(f"Machine: {machine.summary(facts)}")
    for name, run in runs.items():
        print(f"{name:>5}: import {run['import_s']:.2f} s, first step {run['first_s']:.2f} s, "
              f"second {run['second_s']:.3f} s")
    for name, ratio in ratios.items():
        verdict = "met" if ratio <= TARGETS[name] else "missed"
        print(f"{name} cache: fused first step / stock first step = {ratio:.1f}x "
              f"(target <= {TARGETS[name]:g}x: {verdict})")


if __name__ == "__main__":
    main()
