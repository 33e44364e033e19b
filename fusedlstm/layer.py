"""`fusedlstm.LSTM`: `keras.layers.LSTM` with its recurrence in one fused kernel."""

import os
import warnings

import keras
from keras import activations
from keras import ops

from fusedlstm.backends import gpu_policy
from fusedlstm import ops as fused_ops
from fusedlstm.kernels.gates import ACTIVATION_CODES
from fusedlstm.kernels.select import KERNEL_ENV

_USE_FUSED_VALUES = ("auto", True, False)


@keras.saving.register_keras_serializable(package="fusedlstm")
class LSTM(keras.layers.LSTM):
    """Long Short-Term Memory layer whose recurrence runs in one fused kernel.

    A drop-in for `keras.layers.LSTM`: the same constructor, config and
    weights (`kernel` [C, 4H], `recurrent_kernel` [H, 4H], `bias` [4H], gates
    in the column order i, f, c, o), so `get_weights()` and checkpoints are
    interchangeable with the stock layer. Only the timestep recurrence
    changes: the input projection runs as one matmul over all timesteps, and
    the sequential part runs in a Numba kernel (`njit` on the CPU) with a
    matching backward kernel for training.

    The fused path is used when all of the following hold:

    1. `use_fused` is `"auto"` or `True`.
    2. `activation` and `recurrent_activation` are among `"tanh"`,
       `"sigmoid"`, `"hard_sigmoid"`, `"relu"`, `"linear"` and
       `"softsign"` (given by name or as the `keras.activations` function).
    3. `unroll` is `False`.
    4. The Keras backend is TensorFlow, PyTorch or JAX.
    5. On JAX, the default device is a CPU, or `FUSEDLSTM_KERNEL=cuda` asks
       for the CUDA kernels (their operands then go through the host). On a
       JAX GPU the stock layer runs cuDNN otherwise.

    Everything else runs fused: `use_bias=False`, `unit_forget_bias`,
    `return_sequences`, `return_state`, `go_backwards`, `stateful`,
    `initial_state`, any mask (right- or left-padded, holes, fully masked
    rows), `dropout` and `recurrent_dropout` (with the very masks the stock
    layer draws), `Bidirectional` and `TimeDistributed` wrappers, and mixed
    precision (variables in float32, the kernel computing in float32, outputs
    in the policy's compute dtype). When a condition fails, `use_fused="auto"`
    warns once and runs the stock loop; `use_fused=True` raises a
    `ValueError` naming the reason. On a GPU, `"auto"` runs the stock layer
    (one warning) until the CUDA kernels are verified on a GPU; after that,
    or with `FUSEDLSTM_KERNEL=cuda`, fused only where the stock layer would
    leave cuDNN (masks, recurrent dropout, activations cuDNN lacks) or where
    the performance model predicts a win, and cuDNN elsewhere (rule:
    `fusedlstm.backends.gpu_policy`).

    On TensorFlow and PyTorch the kernel is a Python callback, so the layer
    sets `supports_jit = False` and Keras runs the model without XLA. On JAX
    the kernel is an XLA custom call: the layer compiles with the rest of the
    model under `jax.jit` (Keras's default there).

    Args:
        units: Positive integer, dimensionality of the output space.
        activation: Activation function to use. Default: hyperbolic tangent
            (`tanh`).
        recurrent_activation: Activation function to use for the recurrent
            step. Default: sigmoid (`sigmoid`).
        use_bias: Boolean, whether the layer should use a bias vector.
            Default: `True`.
        kernel_initializer: Initializer for the `kernel` weights matrix, used
            for the linear transformation of the inputs. Default:
            `"glorot_uniform"`.
        recurrent_initializer: Initializer for the `recurrent_kernel` weights
            matrix, used for the linear transformation of the recurrent
            state. Default: `"orthogonal"`.
        bias_initializer: Initializer for the bias vector. Default: `"zeros"`.
        unit_forget_bias: Boolean. If `True`, add 1 to the bias of the forget
            gate at initialization. Default: `True`.
        kernel_regularizer: Regularizer function applied to the `kernel`
            weights matrix. Default: `None`.
        recurrent_regularizer: Regularizer function applied to the
            `recurrent_kernel` weights matrix. Default: `None`.
        bias_regularizer: Regularizer function applied to the bias vector.
            Default: `None`.
        activity_regularizer: Regularizer function applied to the output of
            the layer (its "activation"). Default: `None`.
        kernel_constraint: Constraint function applied to the `kernel`
            weights matrix. Default: `None`.
        recurrent_constraint: Constraint function applied to the
            `recurrent_kernel` weights matrix. Default: `None`.
        bias_constraint: Constraint function applied to the bias vector.
            Default: `None`.
        dropout: Float between 0 and 1. Fraction of the units to drop for the
            linear transformation of the inputs. Default: 0.
        recurrent_dropout: Float between 0 and 1. Fraction of the units to
            drop for the linear transformation of the recurrent state.
            Default: 0.
        seed: Random seed for dropout.
        return_sequences: Boolean. Whether to return the last output in the
            output sequence, or the full sequence. Default: `False`.
        return_state: Boolean. Whether to return the last state in addition
            to the output. Default: `False`.
        go_backwards: Boolean (default: `False`). If `True`, process the
            input sequence backwards and return the reversed sequence.
        stateful: Boolean (default: `False`). If `True`, the last state for
            each sample at index i in a batch will be used as initial state
            for the sample of index i in the following batch.
        unroll: Boolean (default: `False`). If `True`, the network is
            unrolled by the stock loop; the fused path never unrolls.
        use_cudnn: Passed to `keras.layers.LSTM`; only used when the stock
            loop runs (`use_fused=False` or a fallback).
        use_fused: `"auto"`, `True` or `False`. `"auto"` runs fused when the
            configuration allows and falls back to the stock loop with one
            warning otherwise; `True` raises a `ValueError` when the
            configuration cannot run fused; `False` is the stock layer.
            Default: `"auto"`.

    Call arguments:
        inputs: A 3D tensor, with shape `(batch, timesteps, feature)`.
        mask: Binary tensor of shape `(samples, timesteps)` indicating whether
            a given timestep should be masked (optional).
        training: Python boolean indicating whether the layer should behave in
            training mode or in inference mode. Only relevant if `dropout` or
            `recurrent_dropout` is used (optional).
        initial_state: List of initial state tensors `[h, c]`, each of shape
            `(batch, units)`, to be passed to the first call of the cell
            (optional).

    Returns:
        The same as `keras.layers.LSTM`: the last output `(batch, units)`,
        or the whole sequence `(batch, timesteps, units)` with
        `return_sequences=True`, followed by the final `h` and `c` with
        `return_state=True`.

    Example:

    >>> import numpy as np
    >>> import fusedlstm
    >>> inputs = np.random.random((32, 10, 8)).astype("float32")
    >>> lstm = fusedlstm.LSTM(4)
    >>> output = lstm(inputs)
    >>> output.shape
    TensorShape([32, 4])
    >>> lstm = fusedlstm.LSTM(4, return_sequences=True, return_state=True)
    >>> whole_seq_output, final_memory_state, final_carry_state = lstm(inputs)
    >>> whole_seq_output.shape
    TensorShape([32, 10, 4])
    >>> final_carry_state.shape
    TensorShape([32, 4])
    """

    def __init__(self, units, *args, use_fused="auto", **kwargs):
        _check_units(units)
        _check_use_fused(use_fused)
        super().__init__(units, *args, **kwargs)
        self.use_fused = use_fused
        self._fallback_warned = False
        reason = self.fused_unsupported_reason()
        if use_fused is True and reason:
            raise ValueError(
                f"use_fused=True, but layer '{self.name}' cannot run fused: {reason}. "
                "Pass use_fused='auto' to fall back to the stock loop."
            )
        if self._fused_enabled() and (
                keras.backend.backend() not in fused_ops.JIT_COMPATIBLE_BACKENDS):
            self.supports_jit = False

    def fused_unsupported_reason(self):
        """Why this configuration cannot run fused, or `None` when it can."""
        for arg in ("activation", "recurrent_activation"):
            if _activation_code(getattr(self.cell, arg)) is None:
                return (
                    f"`{arg}` must be one of {sorted(ACTIVATION_CODES)}, "
                    f"received {activations.serialize(getattr(self.cell, arg))!r}"
                )
        if self.unroll:
            return "unroll=True unrolls the stock loop, which the fused kernel replaces"
        name = keras.backend.backend()
        if name not in fused_ops.SUPPORTED_BACKENDS:
            return f"the Keras backend {name!r} has no fused op yet"
        if name == "jax" and _jax_on_accelerator() and os.environ.get(KERNEL_ENV) != "cuda":
            return (
                "on a JAX GPU the stock layer runs cuDNN; set "
                f"{KERNEL_ENV}=cuda to run the fused CUDA kernels (through the host)"
            )
        return None

    def _fused_enabled(self):
        return self.use_fused is not False and self.fused_unsupported_reason() is None

    def call(self, sequences, initial_state=None, mask=None, training=False):
        self._check_call_args(sequences, initial_state, mask)
        return super().call(
            sequences, initial_state=initial_state, mask=mask, training=training
        )

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if self.use_fused is False or sequences.shape[0] == 0:
            # An empty batch behaves as in the stock layer of each backend.
            return super().inner_loop(sequences, initial_state, mask, training=training)
        if not self._fused_enabled():
            self._warn_fallback_once()
            return super().inner_loop(sequences, initial_state, mask, training=training)
        if self.use_fused == "auto" and not gpu_policy.fused_on_auto(
                gpu_policy.call_of(self, sequences, mask, training)):
            return super().inner_loop(sequences, initial_state, mask, training=training)
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        return self._fused_loop(sequences, initial_state, mask, bool(training))

    def _fused_loop(self, sequences, initial_state, mask, training):
        cell = self.cell
        x = ops.cast(sequences, "float32")
        if mask is not None:
            mask = ops.cast(mask, "bool")
        if self.go_backwards:
            x = ops.flip(x, axis=1)
            mask = None if mask is None else ops.flip(mask, axis=1)
        input_mask = recurrent_mask = None
        if training and 0.0 < cell.dropout < 1.0:
            dropout_mask = cell.get_dropout_mask(sequences[:, 0, :])
            if isinstance(dropout_mask, (list, tuple)):
                input_mask = self._per_gate(dropout_mask)
            else:
                x = x * ops.expand_dims(ops.cast(dropout_mask, "float32"), 1)
        if training and 0.0 < cell.recurrent_dropout < 1.0:
            recurrent_mask = self._per_gate(cell.get_recurrent_dropout_mask(initial_state[0]))
        units = cell.units
        bias = cell.bias if cell.use_bias else ops.zeros((4 * units,))
        config = fused_ops.RecurrenceConfig(
            activation=_activation_code(cell.activation),
            recurrent_activation=_activation_code(cell.recurrent_activation),
            zero_output_for_mask=bool(self.zero_output_for_mask),
            training=training,
        )
        outputs, h, c = fused_ops.lstm_sequence(
            x,
            *(ops.cast(w, "float32") for w in (cell.kernel, bias, cell.recurrent_kernel)),
            ops.cast(initial_state[0], "float32"),
            ops.cast(initial_state[1], "float32"),
            mask,
            input_mask,
            recurrent_mask,
            config,
        )
        last_output = outputs[:, -1]
        if not self.return_sequences:
            outputs = ops.expand_dims(last_output, 1)
        return last_output, outputs, [h, c]

    @staticmethod
    def _per_gate(masks):
        """[4, N, K] float32 from the cell's one or four cached dropout masks."""
        if not isinstance(masks, (list, tuple)):
            masks = [masks] * 4
        return ops.stack([ops.cast(m, "float32") for m in masks])

    def _warn_fallback_once(self):
        if not self._fallback_warned:
            warnings.warn(
                f"Layer '{self.name}' runs the stock LSTM loop: "
                f"{self.fused_unsupported_reason()}.",
                stacklevel=3,
            )
            self._fallback_warned = True

    def _check_call_args(self, sequences, initial_state, mask):
        shape = tuple(sequences.shape)
        batch, steps, features = shape  # rank 3: Keras checks `input_spec` first
        if steps == 0:
            raise ValueError(
                f"Layer '{self.name}' needs at least one timestep. "
                f"Received: inputs.shape={shape}"
            )
        if self.built and getattr(self.cell, "kernel", None) is not None:
            expected = self.cell.kernel.shape[0]
            if features is not None and features != expected:
                raise ValueError(
                    f"Layer '{self.name}' was built for inputs with {expected} "
                    f"features (kernel shape {tuple(self.cell.kernel.shape)}). "
                    f"Received: inputs.shape={shape}"
                )
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        if mask is not None and not _shape_matches(mask.shape, (batch, steps)):
            raise ValueError(
                f"Layer '{self.name}' expects a mask of shape (batch_size, timesteps) "
                f"= {(batch, steps)}. Received: mask.shape={tuple(mask.shape)}"
            )
        if initial_state is not None:
            self._check_initial_state(initial_state, batch)

    def _check_initial_state(self, initial_state, batch):
        states = initial_state if isinstance(initial_state, (list, tuple)) else [initial_state]
        expected = (batch, self.cell.units)
        if len(states) != 2:
            raise ValueError(
                f"Layer '{self.name}' expects 2 initial states [h, c], each of shape "
                f"(batch_size, units) = {expected}. Received {len(states)} state(s)."
            )
        for name, state in zip("hc", states):
            if not _shape_matches(state.shape, expected):
                raise ValueError(
                    f"Layer '{self.name}' expects initial state {name} of shape "
                    f"(batch_size, units) = {expected}. "
                    f"Received: shape={tuple(state.shape)}"
                )

    def get_config(self):
        config = super().get_config()
        config["use_cudnn"] = self.use_cudnn
        config["use_fused"] = self.use_fused
        return config


def _activation_code(fn):
    try:
        name = activations.serialize(fn)
    except (ValueError, TypeError):
        return None
    return ACTIVATION_CODES.get(name) if isinstance(name, str) else None


def _jax_on_accelerator():
    import jax

    return jax.default_backend() != "cpu"


def _shape_matches(shape, expected):
    shape = tuple(shape)
    return len(shape) == len(expected) and all(
        a is None or b is None or a == b for a, b in zip(shape, expected)
    )


def _check_units(units):
    if isinstance(units, bool) or not isinstance(units, int) or units <= 0:
        raise ValueError(
            "Received an invalid value for argument `units`, expected a positive "
            f"integer, got {units!r}."
        )


def _check_use_fused(use_fused):
    if not (use_fused is True or use_fused is False or use_fused == "auto"):
        raise ValueError(
            f"Invalid value for argument `use_fused`. Expected one of "
            f"{_USE_FUSED_VALUES}. Received: use_fused={use_fused!r}"
        )
