"""`fusedlstm.LSTM`: `keras.layers.LSTM` with its recurrence in one fused kernel."""

import os
import warnings

import keras
from keras import activations
from keras import ops

from fusedlstm.backends import gpu_policy
from fusedlstm import ops as fused_ops
from fusedlstm.kernels.gates import ACTIVATION_CODES, SIGMOID, TANH
from fusedlstm.kernels.select import KERNEL_ENV

_USE_FUSED_VALUES = ("auto", True, False)


@keras.saving.register_keras_serializable(package="fusedlstm")
class LSTM(keras.layers.LSTM):
    """Long Short-Term Memory layer whose recurrence runs in one fused kernel.

    A drop-in for `keras.layers.LSTM`: the same constructor, config and
    weights (`kernel` [C, 4H], `recurrent_kernel` [H, 4H], `bias` [4H], gates
    in the column order i, f, c, o), so `get_weights()` and checkpoints are
    interchangeable with the stock layer. Only the timestep recurrence
    changes: on the CPU one Numba kernel (`njit`) runs the whole layer, the
    input projection, the recurrence and in training the weight gradients; on
    a GPU the input projection runs as one matmul over all timesteps and the
    sequential part in a CUDA kernel, with a matching backward kernel for
    training. On first use on a machine, while the CPU kernels compile in a
    background thread, the same op runs a NumPy implementation of the same
    math (`fusedlstm.kernels.cpu`).

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

    Two cases run the stock layer's ops by design. A statically known single
    timestep outside training, without a mask (streaming one step per call),
    runs as one call of the cell under `use_fused="auto"`: with no recurrence
    to fuse, the cell's two matmuls beat a kernel launch. And while the
    layer is traced for export (`keras.Model.export`, `tf.saved_model.save`,
    `torch.onnx.export`, `torch.export`, jax2tf), it traces the framework's
    own LSTM ops, so the artifact serves where fusedlstm is not installed
    (`fusedlstm.convert.export`).

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
            a given timestep should be masked (optional). A mask of shape
            `(1, timesteps)` applies to every sample, as in the stock layer.
        training: Python boolean indicating whether the layer should behave in
            training mode or in inference mode. Only relevant if `dropout` or
            `recurrent_dropout` is used (optional).
        initial_state: List of initial state tensors `[h, c]`, each of shape
            `(batch, units)`, to be passed to the first call of the cell
            (optional). A state of shape `(1, units)` starts every sample,
            as in the stock layer (not on JAX, whose stock layer refuses it).

    Shapes that a `tf.function` trace leaves unknown (a `None` batch or
    length) are checked when the call runs: a mask or state with the wrong
    rows, length or units, or an empty sequence, raises an
    `InvalidArgumentError` before the kernel runs. An empty batch returns
    empty results.

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
        if fused_ops.tracing_for_export(sequences):
            # First: on JAX the batch may be symbolic here, which nothing below may read.
            return self._export_loop(sequences, initial_state, mask, training)
        if self.use_fused == "auto" and sequences.shape[1] == 1 and mask is None and not training:
            return self._single_step(sequences, initial_state)
        if self.use_fused is False:
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

    def _export_loop(self, sequences, initial_state, mask, training):
        """The recurrence as ops an exported artifact can carry (no Python callback).

        Used while the layer is traced for export (`fusedlstm.ops.tracing_for_export`:
        `keras.Model.export`, `tf.saved_model.save`, `torch.onnx.export`,
        `torch.export`, jax2tf), so the artifact serves in a process without
        fusedlstm. With tanh/sigmoid activations, a bias, no mask, float32 and
        no training-time dropout: the framework's own LSTM ops
        (`fusedlstm.ops.export_sequence`), which converters turn into native
        LSTM ops (ONNX `LSTM`, TFLite `UNIDIRECTIONAL_SEQUENCE_LSTM`).
        Otherwise, and on JAX: the stock layer's loop, which serializes as
        the stock layer's does, unrolled where the format converts only that
        (`fusedlstm.ops.export_unrolls_stock_loop`: TF LiteRT and OpenVINO).

        Raises:
            ValueError: where the format being written cannot express an LSTM.
        """
        fused_ops.check_export_format()
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        cell = self.cell
        native = (
            mask is None and cell.use_bias
            and (_activation_code(cell.activation), _activation_code(cell.recurrent_activation))
            == (TANH, SIGMOID)
            and keras.backend.standardize_dtype(sequences.dtype) == "float32"
            and not (training and (cell.dropout or cell.recurrent_dropout))
        )
        result = None if not native else fused_ops.export_sequence(
            sequences, cell.kernel, cell.recurrent_kernel, cell.bias,
            initial_state[0], initial_state[1], self.go_backwards)
        if result is None:
            if fused_ops.export_unrolls_stock_loop(sequences):
                return self._unrolled_stock_loop(sequences, initial_state, mask, training)
            return super().inner_loop(sequences, initial_state, mask, training=training)
        outputs, h, c = result
        last_output = outputs[:, -1]
        if not self.return_sequences:
            outputs = ops.expand_dims(last_output, 1)
        return last_output, outputs, [h, c]

    def _unrolled_stock_loop(self, sequences, initial_state, mask, training):
        """The stock layer's step loop (`keras.layers.RNN.inner_loop`), unrolled."""

        def step(inputs, states):
            output, new_states = self.cell(inputs, states, training=training)
            return output, list(new_states)

        return keras.src.backend.rnn(
            step, sequences, list(initial_state), go_backwards=self.go_backwards, mask=mask,
            unroll=True, input_length=sequences.shape[1],
            zero_output_for_mask=self.zero_output_for_mask,
            return_all_outputs=self.return_sequences)

    def _single_step(self, sequences, initial_state):
        """One timestep (streaming inference) as the cell's own ops: no loop, no kernel.

        With one step there is no recurrence to fuse, and a kernel launch (a
        Python callback on TensorFlow and PyTorch) costs more than the step's
        two matmuls: one stateful step per call in a `tf.function` ran slower
        fused than stock (benchmarks/test_streaming.py). So `use_fused="auto"`
        runs a statically known T == 1 without a mask, outside training, as
        one call of the stock `LSTMCell`; `use_fused=True` still runs the kernel.
        """
        states = list(initial_state)
        if keras.backend.backend() == "torch" and self.stateful:
            # As the stock loop does: the state variables must not alias autograd's tensors.
            states = [ops.copy(s) for s in states]
        output, (h, c) = self.cell(sequences[:, 0], states, training=False)
        return output, ops.expand_dims(output, 1), [h, c]

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
        h0, c0 = (ops.cast(state, "float32") for state in initial_state[:2])
        if training and 0.0 < cell.recurrent_dropout < 1.0:
            # Drawn on the state as given: a one-row state draws one row, as in the stock cell.
            recurrent_mask = self._per_gate(cell.get_recurrent_dropout_mask(initial_state[0]))
        x, mask, h0, c0, recurrent_mask = self._conform(x, mask, h0, c0, recurrent_mask)
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
            h0,
            c0,
            mask,
            input_mask,
            recurrent_mask,
            config,
        )
        # Without a mask the last output is h_n itself: no slice op on the hot path.
        last_output = h if mask is None else outputs[:, -1]
        if not self.return_sequences:
            outputs = ops.expand_dims(last_output, 1)
        return last_output, outputs, [h, c]

    def _conform(self, x, mask, h0, c0, recurrent_mask):
        """Checks at run time what the trace could not, and broadcasts one-row masks
        and states over the batch, as the stock layer does.

        Only TensorFlow traces with unknown dimensions (`tf.function`, a `None`
        batch or length): there, a mask or state with the wrong rows, length or
        units raises an `InvalidArgumentError` before the kernel runs, as the
        stock layer's ops do, and so does an empty sequence. Elsewhere
        `_check_call_args` has checked every shape already.
        """
        units = self.cell.units
        arrays = [x] + [a for a in (mask, h0, c0) if a is not None]
        if any(d is None for a in arrays for d in a.shape):
            x = _assert_runtime_shapes(self.name, x, mask, h0, c0, units)
        batch, steps = ops.shape(x)[0], ops.shape(x)[1]

        def broadcast(array, shape, axis):
            if array is None or (array.shape[axis] is not None
                                 and array.shape[axis] == x.shape[0]):
                return array
            return ops.broadcast_to(array, shape)

        return (x, broadcast(mask, (batch, steps), 0), broadcast(h0, (batch, units), 0),
                broadcast(c0, (batch, units), 0),
                broadcast(recurrent_mask, (4, batch, units), 1))

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
        if mask is not None and not _shape_matches(mask.shape, (batch, steps), rows=True):
            raise ValueError(
                f"Layer '{self.name}' expects a mask of shape (batch_size, timesteps) "
                f"= {(batch, steps)}, or (1, timesteps) for one mask over the batch. "
                f"Received: mask.shape={tuple(mask.shape)}"
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
        # The stock layer broadcasts a one-row state over the batch, except on JAX
        # (whose `lax.scan` refuses a carry that changes shape).
        one_row = keras.backend.backend() != "jax"
        for name, state in zip("hc", states):
            if not _shape_matches(state.shape, expected, rows=one_row):
                raise ValueError(
                    f"Layer '{self.name}' expects initial state {name} of shape "
                    f"(batch_size, units) = {expected}"
                    f"{', or (1, units) for one state over the batch' if one_row else ''}. "
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


def _shape_matches(shape, expected, rows=False):
    """Whether `shape` can be `expected` (None matches anything); with `rows`, a
    first dimension of 1 matches too (broadcast over the batch)."""
    shape = tuple(shape)
    return len(shape) == len(expected) and all(
        a is None or b is None or a == b or (rows and k == 0 and a == 1)
        for k, (a, b) in enumerate(zip(shape, expected))
    )


def _assert_runtime_shapes(name, x, mask, h0, c0, units):
    """`x`, after TensorFlow assertions on the shapes a trace left unknown.

    Each assertion raises an `InvalidArgumentError` naming what was expected and
    what was received; everything computed from the returned `x` runs after them.
    """
    if keras.backend.backend() != "tensorflow":
        return x
    import tensorflow as tf

    shape = tf.shape(x)
    batch, steps = shape[0], shape[1]
    checks = [tf.debugging.Assert(
        steps > 0, [f"Layer '{name}' needs at least one timestep. Received: inputs.shape=",
                    shape], name="timesteps")]
    if mask is not None:
        received = tf.shape(mask)
        checks.append(tf.debugging.Assert(
            tf.logical_and(tf.logical_or(received[0] == batch, received[0] == 1),
                           received[1] == steps),
            [f"Layer '{name}' expects a mask of shape (batch_size, timesteps) =", shape[:2],
             "or (1, timesteps). Received: mask.shape=", received], name="mask_shape"))
    for state_name, state in (("h", h0), ("c", c0)):
        received = tf.shape(state)
        checks.append(tf.debugging.Assert(
            tf.logical_and(tf.logical_or(received[0] == batch, received[0] == 1),
                           received[1] == units),
            [f"Layer '{name}' expects initial state {state_name} of shape "
             f"(batch_size, units) = (", batch, f", {units}) or (1, {units}). "
             "Received: shape=", received], name=f"initial_state_{state_name}"))
    with tf.control_dependencies(checks):
        return tf.identity(x)


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
