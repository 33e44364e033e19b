"""Where `use_fused="auto"` runs the fused CUDA kernels on a GPU.

The rule, for a call whose inputs are on a GPU (`FUSEDLSTM_KERNEL` unset or
`auto`):

0. The stock layer, with one warning, until the CUDA kernels are verified on
   a GPU (`CUDA_KERNELS_VERIFIED`: a committed `benchmarks/gpu_run.py` result,
   `benchmarks/results/gpu-h200.json`, with `"verified": true`, written only
   by a real GPU run in which every check passed), or when the CUDA kernels
   cannot be imported (numba-cuda or cuda-core missing). `use_fused=True`
   or `FUSEDLSTM_KERNEL=cuda` opts in before that; with the latter the
   rules below apply.
1. Fused whenever the stock layer would leave cuDNN for its slow step loop:
   any mask on the torch and JAX backends; on TensorFlow a mask, unless it is
   known to be right-padded, which the rule never reads (it decides from
   static information only and copies nothing to the host: every mask counts
   as not right-padded); recurrent dropout while training; an activation pair
   other than tanh/sigmoid; or `use_bias=False`.
2. Otherwise fused only where the performance model
   (`benchmarks/gpu/model.py`, a prediction for an H100 SXM that no GPU has
   confirmed yet) predicts the fused forward step faster than cuDNN's:
   batch sizes up to `FUSED_MAX_BATCH[H]` for the nearest modelled H at or
   above `units`, and no H above the largest modelled one.
3. Otherwise the stock layer (cuDNN).

On the CPU `"auto"` always runs fused; `use_fused=True` and `False` are
never overridden. With `FUSEDLSTM_KERNEL=cpu` rule 0 does not apply (the
CUDA kernels do not run).
"""

import bisect
import dataclasses
import os
import warnings

from fusedlstm.kernels.select import KERNEL_ENV, cuda_import_error

# Whether a real GPU run of `benchmarks/gpu_run.py` passed every check
# (benchmarks/results/gpu-h200.json, "verified"; tests/test_gpu_policy.py
# keeps the two in step). Set it to True only together with that file.
CUDA_KERNELS_VERIFIED = False

# Largest modelled batch at which the model predicts the fused forward step
# faster than cuDNN's fp32 step, per hidden size
# (benchmarks/results/gpu-model-h100.json; tests/test_gpu_policy.py keeps
# the two in step).
FUSED_MAX_BATCH = {256: 16, 512: 16, 1024: 1}

UNVERIFIED_WARNING = (
    "fusedlstm: use_fused='auto' runs the stock LSTM on the GPU: the CUDA kernels are not "
    "yet verified on a GPU (no committed benchmarks/gpu_run.py result with "
    "\"verified\": true). Opt in with fusedlstm.LSTM(..., use_fused=True) or "
    "FUSEDLSTM_KERNEL=cuda.")
NO_CUDA_WARNING = (
    "fusedlstm: use_fused='auto' runs the stock LSTM on the GPU: the CUDA kernels cannot be "
    "imported ({error}). Install numba-cuda and cuda-core to use them.")
_WARNED = set()


@dataclasses.dataclass(frozen=True)
class Call:
    """What the rule looks at in one call of the layer: static information only."""

    backend: str
    on_gpu: bool
    activation: str
    recurrent_activation: str
    use_bias: bool
    recurrent_dropout: float
    training: bool
    has_mask: bool
    batch: int
    units: int
    kernel_choice: str = "auto"  # FUSEDLSTM_KERNEL


def fused_on_auto(call):
    """Whether `use_fused="auto"` runs the fused kernels for `call`.

    Warns once (per message and process) where rule 0 picks the stock layer.
    """
    if not call.on_gpu:
        return True
    if call.kernel_choice == "auto":
        error = cuda_import_error()
        if error is not None:
            _warn_once(NO_CUDA_WARNING.format(error=error))
            return False
        if not CUDA_KERNELS_VERIFIED:
            _warn_once(UNVERIFIED_WARNING)
            return False
    if stock_leaves_cudnn(call):
        return True
    return model_predicts_fused_win(call.batch, call.units)


def stock_leaves_cudnn(call):
    """Whether the stock Keras LSTM would run its step loop instead of cuDNN.

    A mask on TensorFlow counts as not right-padded (its values are not read).
    """
    if (call.activation, call.recurrent_activation) != ("tanh", "sigmoid"):
        return True
    if not call.use_bias:
        return True
    if call.training and call.recurrent_dropout > 0:
        return True
    return call.has_mask


def model_predicts_fused_win(batch, units):
    """Rule 2: the model's predicted wins, by batch size and hidden size."""
    sizes = sorted(FUSED_MAX_BATCH)
    index = bisect.bisect_left(sizes, units)
    if index == len(sizes):
        return False
    return batch <= FUSED_MAX_BATCH[sizes[index]]


def call_of(layer, sequences, mask, training):
    """The `Call` of one `inner_loop` call of a `fusedlstm.LSTM` layer.

    Reads shapes, the layer's configuration and where `sequences` lives;
    never the values of `sequences` or `mask`.
    """
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
        batch=int(sequences.shape[0] or 0),
        units=int(cell.units),
        kernel_choice=os.environ.get(KERNEL_ENV, "auto"),
    )


def _on_gpu(tensor, backend):
    if backend == "torch":
        return getattr(getattr(tensor, "device", None), "type", None) == "cuda"
    if backend == "tensorflow":
        from fusedlstm.backends.tensorflow import runs_on_gpu

        return runs_on_gpu(tensor)
    return False


def _warn_once(message):
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=4)
