"""Start-up cost of the fused layer: the first call in a fresh process, with the
compiled-kernel cache empty (cold) and filled (warm).

Each figure is the first call's time (forward and a training step) minus the
second call's, so it is what JIT compilation or cache loading adds.

    python benchmarks/startup.py [--out benchmarks/results]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, time
import numpy as np, tensorflow as tf
import fusedlstm
layer = fusedlstm.LSTM(32, return_sequences=True)
x = tf.constant(np.random.default_rng(0).normal(size=(4, 20, 8)).astype("float32"))

def step():
    start = time.perf_counter()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True))
    tape.gradient(loss, layer.trainable_weights)[0].numpy()
    return time.perf_counter() - start

layer.build(x.shape)
first, second = step(), step()
print(json.dumps({"first_s": first, "second_s": second}))
"""


def first_call_overhead(cache_dir):
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                          text=True, check=True)
    times = json.loads(done.stdout.strip().splitlines()[-1])
    return {**times, "added_s": times["first_s"] - times["second_s"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        results = {"cold": first_call_overhead(cache_dir),
                   "warm": first_call_overhead(cache_dir)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "startup.json"), "w") as f:
        json.dump(results, f, indent=1)
    for name, r in results.items():
        print(f"{name} cache: first call {r['first_s']:.2f} s, second {r['second_s']:.3f} s, "
              f"start-up adds {r['added_s']:.2f} s")


if __name__ == "__main__":
    main()
