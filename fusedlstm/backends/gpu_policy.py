"""Where `use_fused="auto"` runs the fused CUDA kernels on a GPU.

The rule, for a call whose inputs are on a GPU:

1. Fused whenever the stock layer would leave cuDNN for its slow step loop:
   a mask that is not right-padded (left padding, holes; on the torch and
   JAX backends any mask), recurrent dropout while training, an activation
   pair other than tanh/sigmoid, or `use_bias=False`. A mask whose padding
   cannot be read at trace time counts as not right-padded.
2. Otherwise fused only where the performance model
   (`benchmarks/gpu_model.py`, a prediction for an H100 SXM that no GPU has
   confirmed yet) predicts the fused forward step faster than cuDNN's:
   batch sizes up to `FUSED_MAX_BATCH[H]` for the nearest modelled H at or
   above `units`, and no H above the largest modelled one.
3. Otherwise the stock layer (cuDNN).

On the CPU `"auto"` always runs fused; `use_fused=True` and `False` are
never overridden.
"""

import bisect
import dataclasses

import keras
import numpy as np

# Largest modelled batch at which the model predicts the fused forward step
# faster than cuDNN's fp32 step, per hidden size
# (benchmarks/results/gpu-model-h100.json; tests/test_gpu_policy.py keeps
# the two in step).
FUSED_MAX_BATCH = {256: 16, 512: 16, 1024: 1}


@dataclasses.dataclass(frozen=True)
class Call:
    """What the rule looks at in one call of the layer."""

    backend: str
    on_gpu: bool
    activation: str
    recurrent_activation: str
    use_bias: bool
    recurrent_dropout: float
    training: bool
    has_mask: bool
    mask_right_padded: bool
    batch: int
    units: int


def fused_on_auto(call):
    """Whether `use_fused="auto"` runs the fused kernels for `call`."""
    if not call.on_gpu:
        return True
    if stock_leaves_cudnn(call):
        return True
    return model_predicts_fused_win(call.batch, call.units)


def stock_leaves_cudnn(call):
    """Whether the stock Keras LSTM would run its step loop instead of cuDNN."""
    if (call.activation, call.recurrent_activation) != ("tanh", "sigmoid"):
        return True
    if not call.use_bias:
        return True
    if call.training and call.recurrent_dropout > 0:
        return True
    if call.has_mask:
        return call.backend != "tensorflow" or not call.mask_right_padded
    return False


def model_predicts_fused_win(batch, units):
    """Rule 2: the model's predicted wins, by batch size and hidden size."""
    sizes = sorted(FUSED_MAX_BATCH)
    index = bisect.bisect_left(sizes, units)
    if index == len(sizes):
        return False
    return batch <= FUSED_MAX_BATCH[sizes[index]]


def call_of(layer, sequences, mask, training):
    """The `Call` of one `inner_loop` call of a `fusedlstm.LSTM` layer."""
    import keras

    cell = layer.cell
    backend = keras.backend.backend()
    return Call(
        backend=backend,
        on_gpu=_on_gpu(sequences, backend),
        activation=keras.activations.serialize(cell.activation),
        recurrent_activation=keras.activations.serialize(cell.recurrent_activation),
        use_bias=bool(cell.use_bias),
        recurrent_dropout=float(cell.recurrent_dropout),
        training=bool(training),
        has_mask=mask is not None,
        mask_right_padded=_right_padded(mask),
        batch=int(sequences.shape[0] or 0),
        units=int(cell.units),
    )


def _on_gpu(tensor, backend):
    if backend == "torch":
        return getattr(getattr(tensor, "device", None), "type", None) == "cuda"
    if backend == "tensorflow":
        from fusedlstm.backends.tensorflow import runs_on_gpu

        return runs_on_gpu(tensor)
    return False


def _right_padded(mask):
    """Whether every row of a [N, T] mask is ones then zeros; False when unknown."""
    if mask is None:
        return True
    if isinstance(mask, (list, tuple)):
        mask = mask[0]
    try:
        values = np.asarray(keras.ops.convert_to_numpy(mask), bool)
    except (TypeError, ValueError, NotImplementedError, AttributeError, RuntimeError):
        return False
    if values.ndim != 2:
        return False
    return bool(np.all(values[:, 1:] <= values[:, :-1]))
