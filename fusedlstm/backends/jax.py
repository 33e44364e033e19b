"""JAX glue: the fused LSTM sequence as XLA custom calls in a `jax.custom_vjp`.

On the CPU kernels the whole layer runs in one CPU custom call
(`jax.ffi.ffi_call`) and its backward pass in another: x, the weights and the
masks in, the outputs and every gradient out. Their handlers
(`fusedlstm.backends.xla_ffi`) hand XLA's buffers to the CPU drivers
(`kernels.cpu`, batch-major arrays, as Keras holds them), which write the
results into them. So the op runs inside `jax.jit`,
`jax.grad`, `jax.vmap` (one call per batch element) and Keras's JAX trainer
with XLA on. The forward call saves what the backward pass needs exactly when
JAX differentiates it (`config.training` is not needed here). Under Keras's
`DataParallel` distribution, each device runs the calls on its own rows.

On the CUDA kernels (`FUSEDLSTM_KERNEL=cuda`, see `fusedlstm.layer`), the
projection, the inputs' gradient and the weight gradients run as JAX ops
(`fusedlstm.backends.projection`) around calls of the recurrence alone; on a
JAX GPU device the calls run as `jax.pure_callback`s: their operands go
through the host, and the CUDA kernels' host drivers copy them to the GPU and
back.
"""

import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np
from jax.sharding import PartitionSpec as P

from fusedlstm.backends import projection, xla_ffi
from fusedlstm.backends.contract import module_on_stack, none_if_empty
from fusedlstm.kernels import cpu
from fusedlstm.kernels.select import select_kernels

_FORWARD_TARGET = "fusedlstm_lstm_forward"
_BACKWARD_TARGET = "fusedlstm_lstm_backward"
_LAYER_FORWARD_TARGET = "fusedlstm_layer_forward"
_LAYER_BACKWARD_TARGET = "fusedlstm_layer_backward"
_F32 = jnp.float32


def lstm_sequence(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask,
                  recurrent_mask, config):
    """See `fusedlstm.ops.lstm_sequence`.

    As Keras's JAX backend does, masked steps before a row's first unmasked
    step output the initial state `h0` (the other backends output zeros)
    unless `config.zero_output_for_mask`.
    """
    inputs = tuple(jnp.asarray(t, _F32) for t in (x, kernel, bias, recurrent_kernel, h0, c0))
    batch = inputs[0].shape[0]
    masks = (
        jnp.zeros((0, 0), bool) if mask is None else jnp.asarray(mask, bool),
        jnp.zeros((0, 0, 0), _F32) if input_mask is None else jnp.asarray(input_mask, _F32),
        jnp.zeros((0, 0, 0), _F32) if recurrent_mask is None else jnp.asarray(recurrent_mask, _F32),
    )
    outputs, h_n, c_n = _split_over_batch_devices(functools.partial(_fused, config), batch)(
        inputs, masks)
    if mask is not None and not config.zero_output_for_mask:
        started = jnp.cumsum(masks[0], axis=1) > 0
        outputs = jnp.where(started[..., None], outputs, inputs[4][:, None, :])
    return outputs, h_n, c_n


def _split_over_batch_devices(fused, batch):
    """`fused`, run on each device's rows under Keras's `DataParallel` distribution.

    XLA cannot partition a custom call: without this, each device would
    gather the whole batch and run the recurrence on all of it. The weights'
    gradients are summed over the devices by `shard_map`. A batch that does
    not split evenly runs whole.
    """
    distribution = keras.distribution.distribution()
    if not isinstance(distribution, keras.distribution.DataParallel):
        return fused
    mesh = distribution.device_mesh.backend_mesh
    axis = distribution.batch_dim_name
    if batch % mesh.shape[axis]:
        return fused
    rows, per_gate_rows = P(axis), P(None, axis)
    in_specs = ((rows, P(), P(), P(), rows, rows), (rows, per_gate_rows, per_gate_rows))
    out_specs = (rows, rows, rows)
    return jax.shard_map(fused, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(config, inputs, masks):
    return tuple(_forward(config, inputs, masks, save=False))


def _fused_fwd(config, inputs, masks):
    results = _forward(config, inputs, masks, save=True)
    return tuple(results[:3]), (inputs, masks, tuple(results[3:]))


def _fused_bwd(config, residuals, d_results):
    inputs, masks, saved = residuals
    if _kernels() is cpu:
        x, kernel, bias, recurrent_kernel, h0, c0 = inputs
        grads = _call(_LAYER_BACKWARD_TARGET,
                      [x.shape, kernel.shape, recurrent_kernel.shape, bias.shape, h0.shape,
                       c0.shape], (x, kernel, recurrent_kernel, *masks, *saved, *d_results),
                      _codes(config))
        d_x, d_kernel, d_recurrent_kernel, d_bias, d_h0, d_c0 = grads
        grads = (d_x, d_kernel, d_bias, d_recurrent_kernel, d_h0, d_c0)
    else:
        grads = _projected_gradients(config, inputs, masks, saved, d_results)
    return grads, _zero_cotangents(masks)


def _projected_gradients(config, inputs, masks, saved, d_results):
    """The CUDA kernels' backward call, then the weight gradients as JAX ops."""
    x, kernel, _, recurrent_kernel, _, _ = inputs
    mask, input_mask, recurrent_mask = masks
    d_xw, d_h0, d_c0 = _call(_BACKWARD_TARGET, [saved[2].shape, d_results[1].shape,
                                                 d_results[2].shape],
                             (recurrent_kernel, mask, recurrent_mask, *saved, *d_results),
                             _codes(config))
    input_mask = none_if_empty(input_mask)
    return (projection.input_grad(d_xw, kernel, input_mask),
            projection.gate_weight_grad(x, d_xw, input_mask), jnp.sum(d_xw, (0, 1)),
            projection.gate_weight_grad(saved[0], d_xw, none_if_empty(recurrent_mask)),
            d_h0, d_c0)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _forward(config, inputs, masks, save):
    """`[outputs, h_n, c_n]`, then `[h_in, c_seq, gates]` when `save` (batch-major,
    as `kernels.cpu.forward`)."""
    x, kernel, bias, recurrent_kernel, h0, c0 = inputs
    batch, steps, units = x.shape[0], x.shape[1], recurrent_kernel.shape[0]
    shapes = [(batch, steps, units), (batch, units), (batch, units)]
    if save:
        shapes += [(batch, steps, units), (batch, steps + 1, units),
                   (batch, steps, 4 * units)]
    attrs = dict(_codes(config), save=save)
    if _kernels() is cpu:
        return _call(_LAYER_FORWARD_TARGET, shapes, (*inputs, *masks), attrs)
    mask, input_mask, recurrent_mask = masks
    xw = projection.input_projection(x, kernel, bias, none_if_empty(input_mask))
    return _call(_FORWARD_TARGET, shapes, (xw, recurrent_kernel, h0, c0, mask, recurrent_mask),
                 attrs)


def _call(target, shapes, args, attrs):
    """Runs a handler on `args`: an XLA custom call on the CPU, else a host callback."""
    result_shapes = [jax.ShapeDtypeStruct(s, _F32) for s in shapes]
    if _on_cpu(args[0]):
        _register_targets()
        attrs = {name: np.int32(value) for name, value in attrs.items()}
        return jax.ffi.ffi_call(target, result_shapes, vmap_method="sequential")(*args, **attrs)
    handler = _HANDLERS[target]

    def on_host(*arrays):
        results = [np.empty(s.shape, np.float32) for s in result_shapes]
        handler([np.asarray(a) for a in arrays], results, attrs)
        return results

    return jax.pure_callback(on_host, result_shapes, *args, vmap_method="sequential")


def _on_cpu(array):
    """Whether `array` lives, or in a trace will live, on a CPU device."""
    devices = getattr(array, "devices", None)
    if devices is not None and not isinstance(array, jax.core.Tracer):
        return all(d.platform == "cpu" for d in devices())
    return jax.default_backend() == "cpu"


def _forward_handler(args, results, attrs):
    """The recurrence alone on the CUDA kernels' host drivers, copied into XLA's buffers."""
    xw, recurrent_kernel, h0, c0, mask, recurrent_mask = args
    save = bool(attrs["save"])
    outputs, h_n, c_n, saved = _kernels().forward(
        xw, recurrent_kernel, h0, c0, none_if_empty(mask), none_if_empty(recurrent_mask),
        attrs["activation"], attrs["recurrent_activation"],
        bool(attrs["zero_output_for_mask"]), save)
    _write(results, (outputs, h_n, c_n, *(saved if save else ())))


def _backward_handler(args, results, attrs):
    """The recurrence's backward pass on the CUDA kernels' host drivers."""
    recurrent_kernel, mask, recurrent_mask, h_in, c_seq, gates, *d_results = args
    _write(results, _kernels().backward(
        recurrent_kernel, none_if_empty(mask), none_if_empty(recurrent_mask),
        attrs["activation"], attrs["recurrent_activation"], bool(attrs["zero_output_for_mask"]),
        (h_in, c_seq, gates), *d_results))


def _layer_forward_handler(args, results, attrs):
    """The whole layer's forward pass on the CPU drivers, into XLA's buffers."""
    *inputs, mask, input_mask, recurrent_mask = args
    save = bool(attrs["save"])
    cpu.forward(*inputs, none_if_empty(mask), none_if_empty(input_mask),
                none_if_empty(recurrent_mask), attrs["activation"],
                attrs["recurrent_activation"], bool(attrs["zero_output_for_mask"]), save,
                out=results)


def _layer_backward_handler(args, results, attrs):
    """Every gradient of the whole layer on the CPU drivers, into XLA's buffers."""
    x, kernel, recurrent_kernel, mask, input_mask, recurrent_mask, *saved_and_d = args
    cpu.backward(x, kernel, recurrent_kernel, none_if_empty(mask), none_if_empty(input_mask),
                 none_if_empty(recurrent_mask), attrs["activation"],
                 attrs["recurrent_activation"], bool(attrs["zero_output_for_mask"]),
                 tuple(saved_and_d[:3]), *saved_and_d[3:], out=results)


_HANDLERS = {_FORWARD_TARGET: _forward_handler, _BACKWARD_TARGET: _backward_handler,
             _LAYER_FORWARD_TARGET: _layer_forward_handler,
             _LAYER_BACKWARD_TARGET: _layer_backward_handler}


def _register_targets():
    for target, handler in _HANDLERS.items():
        xla_ffi.register_cpu_target(target, handler)


def _kernels():
    """The CPU kernels, or the CUDA ones on host data when `FUSEDLSTM_KERNEL=cuda`."""
    return select_kernels(data_on_gpu=False)


def _write(results, arrays):
    """Copies the results into XLA's result buffers."""
    for result, array in zip(results, arrays, strict=True):
        np.copyto(result, array)


def _codes(config):
    return {"activation": config.activation,
            "recurrent_activation": config.recurrent_activation,
            "zero_output_for_mask": config.zero_output_for_mask}


def _zero_cotangents(masks):
    mask, input_mask, recurrent_mask = masks
    return (np.zeros(mask.shape, jax.dtypes.float0), jnp.zeros_like(input_mask),
            jnp.zeros_like(recurrent_mask))


# ---------------------------------------------------------------------------
# Export: what the layer traces while an artifact is being written.

# Modules whose frames mean a trace for an artifact: jax2tf (Keras's
# `tf_saved_model` and `openvino` exports on JAX), `jax.export`, Keras's export code.
_EXPORT_MODULES = ("jax.experimental.jax2tf", "jax._src.export", "keras.src.export")
_OPENVINO_EXPORT_MODULE = "keras.src.export.openvino"


def tracing_for_export(sequences):
    """Whether JAX is tracing the layer for an artifact that leaves the process.

    The fused op is an XLA custom call whose handler is a Python function
    registered in this process: a serialized module holding it cannot run
    elsewhere, and jax2tf cannot convert it. Keras sets no export flag
    (`keras/src/backend/jax/export.py` runs `jax2tf.convert` with polymorphic
    shapes), so two signals are read, before anything reads the shape as a
    number:

    1. A symbolic dimension in `sequences.shape` (shape polymorphism, only
       under `jax.export`/jax2tf).
    2. A frame of `jax.experimental.jax2tf`, `jax.export` or
       `keras.src.export` on the Python stack (a static-shape export).

    `jax.jit`, `fit` and `predict` are neither, and run the fused op.
    """
    if any(d is not None and not isinstance(d, int) for d in sequences.shape):
        return True
    return module_on_stack(*_EXPORT_MODULES)


def check_export_format():
    """Raises where Keras's JAX export cannot express an LSTM.

    `model.export(format="openvino")` on JAX converts through jax2tf without
    XLA ops, which fails for the stock `keras.layers.LSTM` as well (its
    `lax.scan`): say so at export time, with the ways that work.

    Raises:
        ValueError: under `keras.src.export.openvino`.
    """
    if module_on_stack(_OPENVINO_EXPORT_MODULE):
        raise ValueError(
            "model.export(format='openvino') cannot express an LSTM layer on the JAX "
            "backend (the stock keras.layers.LSTM fails there too: jax2tf without XLA "
            "ops cannot convert its loop). Export from the TensorFlow or PyTorch backend "
            "instead: the same weights load there.")


def export_unrolls_stock_loop(sequences):
    """False: jax2tf serializes the stock loop's `lax.scan` as it is."""
    del sequences
    return False


def export_sequence(x, kernel, recurrent_kernel, bias, h0, c0, go_backwards):
    """None: the stock Keras loop (`lax.scan`) is what JAX serializes."""
    del x, kernel, recurrent_kernel, bias, h0, c0, go_backwards
    return None

