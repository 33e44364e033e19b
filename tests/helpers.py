"""Backend-agnostic helpers: build layer pairs, masks, and take gradients on TF or torch."""

import json
import os
import subprocess
import sys

import keras
import numpy as np

import fusedlstm
from fusedlstm.testing.parity import outputs_and_grads


def make_pair(random_seed=1, **kwargs):
    """A stock and a fused layer built under the same random seed."""
    keras.utils.set_random_seed(random_seed)
    stock = keras.layers.LSTM(**kwargs)
    keras.utils.set_random_seed(random_seed)
    fused = fusedlstm.LSTM(**kwargs)
    return stock, fused


def make_mask(kind, batch, steps, rng):
    """A [N, T] bool mask: right- or left-padded, or with holes and a fully masked row."""
    lengths = rng.integers(1, steps + 1, size=batch)
    lengths[0] = steps
    positions = np.arange(steps)[None, :]
    if kind == "right":
        return positions < lengths[:, None]
    if kind == "left":
        return positions >= (steps - lengths)[:, None]
    mask = rng.random((batch, steps)) > 0.3
    mask[-1] = False
    return mask


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def run_with_grads(layer, x, mask=None, initial_state=None, training=False, seed=0):
    """`fusedlstm.testing.parity.outputs_and_grads`, with the tests' default probe seed."""
    return outputs_and_grads(layer, x, mask, initial_state, training, seed)


# name: (layer kwargs, call options) for `simulated_cuda_errors`.
SIMULATED_CUDA_CASES = {
    "saved": ({"return_state": True}, {"training": True, "initial_state": True}),
    "recomputed": ({"return_sequences": True}, {"training": False}),
    "masked_dropouts": ({"dropout": 0.3, "recurrent_dropout": 0.4, "seed": 2,
                         "return_sequences": True}, {"training": True, "mask": True}),
}

_SIMULATOR_SCRIPT = """
import json
import sys
import numpy as np
from helpers import SIMULATED_CUDA_CASES, make_mask, make_pair, run_with_grads
from fusedlstm.kernels.select import select_kernels

assert select_kernels(data_on_gpu=False).__name__ == "fusedlstm.kernels.cuda"
rng = np.random.default_rng(0)
errors = {}
for case in json.loads(sys.argv[1]):
    kwargs, options = SIMULATED_CUDA_CASES[case]
    stock, fused = make_pair(units=3, **kwargs)
    x = rng.standard_normal((3, 4, 4)).astype("float32")
    call = {"training": options["training"]}
    if options.get("mask"):
        call["mask"] = make_mask("holes", 3, 4, rng)
    if options.get("initial_state"):
        call["initial_state"] = [rng.standard_normal((3, 3)).astype("float32") for _ in "hc"]
    stock_out, stock_grads = run_with_grads(stock, x, **call)
    fused_out, fused_grads = run_with_grads(fused, x, **call)
    errors[case] = [max(float(np.abs(f - s).max()) for f, s in zip(fused_out, stock_out)),
                    max(float(np.abs(fused_grads[k] - g).max()) for k, g in stock_grads.items())]
print(json.dumps(errors))
"""


def simulated_cuda_errors(backend, cases):
    """`{case: [max |output diff|, max |gradient diff|]}` of the fused layer against the
    stock one, on the Keras `backend` with `FUSEDLSTM_KERNEL=cuda` in Numba's CUDA
    simulator. A subprocess: the simulator must be chosen before `numba.cuda` loads.

    Args:
        cases: names from `SIMULATED_CUDA_CASES`.
    """
    env = dict(os.environ, KERAS_BACKEND=backend, FUSEDLSTM_KERNEL="cuda",
               NUMBA_ENABLE_CUDASIM="1", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", _SIMULATOR_SCRIPT, json.dumps(cases)],
                            capture_output=True, text=True, env=env, timeout=600,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(errors) == sorted(cases)
    return errors

