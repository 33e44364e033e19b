"""TensorFlow glue: the fused LSTM sequence as a `tf.custom_gradient` op.

On the CPU, the whole layer runs in one `tf.numpy_function` callback per
direction on the CPU drivers (`kernels.cpu`: x, the weights and the masks in;
the outputs, and in the backward callback every gradient, out), whose NumPy
host drivers allocate the results: no TF matmul, transpose or copy around
them. On a GPU, the projection, the inputs' gradient and the weight gradients
run as TF matmuls (`fusedlstm.backends.projection`) and the recurrence on the
CUDA kernels in `tf.py_function` callbacks, whose GPU kernel hands them the
GPU tensors as they are. When the forward pass ran without saving
(inference), a gradient request recomputes it with saving.
"""

import contextlib
import functools

import numpy as np
import tensorflow as tf

from fusedlstm.backends import projection
from fusedlstm.backends.contract import module_on_stack, none_if_empty
from fusedlstm.kernels import cpu as kernels
from fusedlstm.kernels.select import select_kernels

_F32 = tf.float32


def lstm_sequence(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask,
                  recurrent_mask, config):
    """See `fusedlstm.ops.lstm_sequence`."""
    x, kernel, bias, recurrent_kernel, h0, c0 = (
        tf.convert_to_tensor(t, _F32) for t in (x, kernel, bias, recurrent_kernel, h0, c0))
    masks = (None if mask is None else tf.cast(mask, tf.bool), input_mask, recurrent_mask)
    if _uses_cuda_kernels(x):
        return _gpu_sequence(x, kernel, bias, recurrent_kernel, h0, c0, masks, config)
    return _cpu_sequence(x, kernel, bias, recurrent_kernel, h0, c0, masks, config)


def _cpu_sequence(x, kernel, bias, recurrent_kernel, h0, c0, masks, config):
    """The CPU op: one callback per direction on the whole-layer drivers (`kernels.cpu`).

    x, the weights and the masks go in as they are; the backward callback
    returns every gradient. A missing mask, or a gradient TF leaves as None,
    is no input at all (each TF tensor made costs an eager op): the callbacks
    are told which are there.
    """
    given = tuple(m is not None for m in masks)
    present = [m for m in masks if m is not None]

    def run_forward(x, kernel, bias, recurrent_kernel, h0, c0, save):
        results = tf.numpy_function(
            functools.partial(_cpu_forward, config, save, given),
            [x, kernel, bias, recurrent_kernel, h0, c0, *present],
            [_F32] * (6 if save else 3), stateful=False)
        _set_shapes(results, x.shape[:2], recurrent_kernel.shape[0])
        return results

    @tf.custom_gradient
    def fused(*args):
        results = run_forward(*args, save=config.training)

        def grad(*d_results):
            saved = results[3:] if config.training else run_forward(*args, save=True)[3:]
            x, kernel, bias, recurrent_kernel, h0, c0 = args
            d_given = tuple(d is not None for d in d_results)
            d_x, d_kernel, d_recurrent_kernel, d_bias, d_h0, d_c0 = tf.numpy_function(
                functools.partial(_cpu_backward, config, given, d_given),
                [x, kernel, recurrent_kernel, *present, *saved,
                 *(d for d in d_results if d is not None)], [_F32] * 6, stateful=False)
            for grad_, like in ((d_x, x), (d_kernel, kernel), (d_recurrent_kernel,
                                recurrent_kernel), (d_bias, bias), (d_h0, h0), (d_c0, c0)):
                grad_.set_shape(like.shape)
            return d_x, d_kernel, d_bias, d_recurrent_kernel, d_h0, d_c0

        return tuple(results[:3]), grad

    return fused(x, kernel, bias, recurrent_kernel, h0, c0)


def _cpu_forward(config, save, given, x, kernel, bias, recurrent_kernel, h0, c0, *masks):
    outputs, h_n, c_n, saved = kernels.forward(
        x, kernel, bias, recurrent_kernel, h0, c0, *_where_given(masks, given),
        config.activation, config.recurrent_activation, config.zero_output_for_mask, save)
    return (outputs, h_n, c_n) + (tuple(saved) if save else ())


def _cpu_backward(config, given, d_given, x, kernel, recurrent_kernel, *arrays):
    count = sum(given)
    h_in, c_seq, gates = arrays[count:count + 3]
    N, T, H = h_in.shape
    d_results = [np.zeros(shape, np.float32) if d is None else d
                 for d, shape in zip(_where_given(arrays[count + 3:], d_given),
                                     [(N, T, H), (N, H), (N, H)])]
    return kernels.backward(
        x, kernel, recurrent_kernel, *_where_given(arrays[:count], given), config.activation,
        config.recurrent_activation, config.zero_output_for_mask, (h_in, c_seq, gates),
        *d_results)


def _where_given(arrays, given):
    """The optional arguments in order: the next of `arrays` where `given`, else None."""
    arrays = iter(arrays)
    return [next(arrays) if g else None for g in given]


def _gpu_sequence(x, kernel, bias, recurrent_kernel, h0, c0, masks, config):
    """The GPU op: the projection and the weight gradients as TF matmuls
    (`fusedlstm.backends.projection`) around the CUDA kernels' callbacks.

    A missing mask travels as an empty placeholder (`none_if_empty`)."""
    mask, input_mask, recurrent_mask = masks
    mask = tf.zeros([0, 0], tf.bool) if mask is None else mask
    input_mask = tf.zeros([0, 0, 0], _F32) if input_mask is None else input_mask
    recurrent_mask = tf.zeros([0, 0, 0], _F32) if recurrent_mask is None else recurrent_mask

    def run_forward(x, kernel, bias, recurrent_kernel, h0, c0, save):
        xw = projection.input_projection(x, kernel, bias, none_if_empty(input_mask))
        inputs = [xw, recurrent_kernel, h0, c0, mask, recurrent_mask]
        results = _gpu_call(functools.partial(_gpu_forward, config, save), inputs,
                            6 if save else 3)
        _set_shapes(results, xw.shape[:2], recurrent_kernel.shape[0])
        return results

    @tf.custom_gradient
    def fused(*args):
        results = run_forward(*args, save=config.training)

        def grad(d_outputs, d_h_n, d_c_n):
            saved = results[3:] if config.training else run_forward(*args, save=True)[3:]
            x, kernel, bias, recurrent_kernel, h0, c0 = args
            d_results = [_zeros_if_none(d_outputs, results[0]),
                         _zeros_if_none(d_h_n, h0), _zeros_if_none(d_c_n, c0)]
            backward_inputs = [recurrent_kernel, mask, recurrent_mask, *saved, *d_results]
            d_xw, d_h0, d_c0 = _gpu_call(
                functools.partial(_gpu_backward, config), backward_inputs, 3)
            d_xw.set_shape(saved[2].shape)
            d_h0.set_shape(h0.shape)
            d_c0.set_shape(c0.shape)
            input_mask_or_none = none_if_empty(input_mask)
            return (projection.input_grad(d_xw, kernel, input_mask_or_none),
                    projection.gate_weight_grad(x, d_xw, input_mask_or_none),
                    tf.reduce_sum(d_xw, [0, 1]),
                    projection.gate_weight_grad(saved[0], d_xw, none_if_empty(recurrent_mask)),
                    d_h0, d_c0)

        return tuple(results[:3]), grad

    return fused(x, kernel, bias, recurrent_kernel, h0, c0)


def _uses_cuda_kernels(tensor):
    """Whether the op runs the CUDA kernels: `tensor` is on a GPU and they are selected."""
    return runs_on_gpu(tensor) and select_kernels(data_on_gpu=True) is not kernels


def runs_on_gpu(tensor):
    """Whether `tensor` is on a GPU or, unplaced in a graph, will be.

    TF places an op without a device on a GPU when one exists.
    """
    device = getattr(tensor, "device", "") or ""
    if device:
        return tf.DeviceSpec.from_string(device).device_type == "GPU"
    return bool(tf.config.list_logical_devices("GPU"))


def _gpu_call(function, inputs, count):
    """Runs a GPU callback: directly on eager tensors, else as a `tf.py_function`.

    An eager `tf.py_function` call under a `GradientTape` keeps its tape,
    inputs and outputs in a global cache until the op's own gradient runs,
    which the custom gradient replaces: device memory would leak every call.
    """
    if tf.executing_eagerly():
        return function(*inputs)
    return tf.py_function(function, inputs, [_F32] * count)


def _gpu_forward(config, save, xw, recurrent_kernel, h0, c0, mask, recurrent_mask):
    """`tf.py_function` body: the forward CUDA kernel on eager GPU tensors."""
    with _numba_device_of(xw):
        outputs, h_n, c_n, saved = select_kernels(data_on_gpu=True).forward(
            *_device_arrays(xw, recurrent_kernel, h0, c0, none_if_empty(mask),
                            none_if_empty(recurrent_mask)),
            config.activation, config.recurrent_activation, config.zero_output_for_mask, save)
        return _to_tf((outputs, h_n, c_n) + (tuple(saved) if save else ()), xw.device)


def _gpu_backward(config, recurrent_kernel, mask, recurrent_mask, h_in, c_seq, gates,
                  d_outputs, d_h_n, d_c_n):
    """`tf.py_function` body: the backward CUDA kernel on eager GPU tensors."""
    with _numba_device_of(d_outputs):
        recurrent_kernel, mask, recurrent_mask, c_seq, gates, *d_results = _device_arrays(
            recurrent_kernel, none_if_empty(mask), none_if_empty(recurrent_mask), c_seq,
            gates, d_outputs, d_h_n, d_c_n)
        results = select_kernels(data_on_gpu=True).backward(
            recurrent_kernel, mask, recurrent_mask, config.activation,
            config.recurrent_activation, config.zero_output_for_mask, (None, c_seq, gates),
            *d_results)
        return _to_tf(results, d_outputs.device)


@contextlib.contextmanager
def _numba_device_of(tensor):
    """Makes the GPU holding `tensor` Numba's current device (multi-GPU: one per call).

    Assumes TF's GPU numbering is CUDA's, which holds unless
    `tf.config.set_visible_devices` hid GPUs.
    """
    spec = tf.DeviceSpec.from_string(tensor.device)
    if spec.device_type != "GPU":
        raise RuntimeError(
            "The fused LSTM's CUDA kernels need their tensors on a GPU. "
            f"Received a tensor on {tensor.device!r}.")
    from numba import cuda

    with cuda.gpus[spec.device_index]:
        yield


class _DLPackExport:
    """Exports a TF tensor to a DLPack consumer that passes a stream.

    numba-cuda calls `__dlpack__(stream=-1)`, and TF refuses every stream but
    None. TF's own `to_dlpack` waits for the tensor's device instead.
    """

    def __init__(self, tensor):
        self._tensor = tensor

    def __dlpack__(self, stream=None, **kwargs):
        return tf.experimental.dlpack.to_dlpack(self._tensor)

    def __dlpack_device__(self):
        return self._tensor.__dlpack_device__()


def _device_arrays(*tensors):
    """Numba device arrays over the memory of eager GPU tensors (None stays None)."""
    return [None if t is None else _numba_array(t) for t in tensors]


def _numba_array(tensor):
    """A Numba device array over the memory of one eager GPU tensor, through DLPack."""
    from cuda.core.utils import StridedMemoryView
    from numba import cuda

    view = StridedMemoryView.from_dlpack(_DLPackExport(tensor), stream_ptr=-1)
    interface = {"shape": tuple(view.shape), "strides": None,
                 "typestr": np.dtype(view.dtype).str, "data": (view.ptr, False),
                 "version": 3}
    return cuda.from_cuda_array_interface(interface, owner=view, sync=False)


def _to_tf(arrays, device):
    """Copies the kernels' device arrays into new TF tensors on `device`.

    TF allocates the outputs (uninitialized) and they are written in place on
    the device. TF's streams are out of Python's reach: the device is
    synchronized before TF reads them.
    """
    from numba import cuda

    with tf.device(device):
        outputs = [tf.raw_ops.Empty(shape=a.shape, dtype=_F32, init=False) for a in arrays]
    for output, array in zip(outputs, arrays):
        _numba_array(output).copy_to_device(array)
    cuda.synchronize()
    return outputs


def _zeros_if_none(grad, like):
    return tf.zeros_like(like) if grad is None else grad


def _set_shapes(results, batch_and_steps, units):
    """Static shapes of the callback's results: batch-major, as `kernels.cpu.forward`."""
    batch, steps = batch_and_steps
    state = tf.TensorShape([batch, units])
    shapes = [tf.TensorShape([batch, steps, units]), state, state]
    if len(results) == 6:
        seq_steps = None if steps is None else steps + 1
        shapes += [tf.TensorShape([batch, steps, units]), tf.TensorShape([batch, seq_steps, units]),
                   tf.TensorShape([batch, steps, 4 * units])]
    for tensor, shape in zip(results, shapes):
        tensor.set_shape(shape)


# ---------------------------------------------------------------------------
# Export: what the layer traces while an artifact is being written.

_KERAS_EXPORT_MODULE = "keras.src.export"
_LITERT_EXPORT_MODULE = "keras.src.export.litert"
_OPENVINO_EXPORT_MODULE = "keras.src.export.openvino"


def tracing_for_export(sequences):
    """Whether this trace of the layer is for an artifact that leaves the process.

    The fused op is a `tf.numpy_function`, whose Python callback lives only in
    the process that traced it: a SavedModel, ONNX, LiteRT or OpenVINO
    artifact holding it fails at serving time. So the layer traces a
    serializable graph instead when the trace is for export. Keras sets no
    flag for that, so two signals are read:

    1. TF is saving: `tensorflow.python.saved_model.save_context` is entered
       by `tf.saved_model.save`, which retraces every `tf.function` it saves
       (the variable policy is part of the tracing key), also when the model
       is passed to it directly or an `ExportArchive` endpoint was traced
       before.
    2. Keras's export code asked for the trace: a frame of a module under
       `keras.src.export` (`saved_model.py`, `onnx.py`, `openvino.py`,
       `litert.py`, called by `keras.Model.export`) is on the Python stack.
       The ONNX, OpenVINO and LiteRT converters read a concrete function
       traced there, outside any save context.

    Eager calls, `fit`, `predict` and a user's own `tf.function` are neither,
    and run the fused op.
    """
    del sequences
    if tf.executing_eagerly():
        return False
    from tensorflow.python.saved_model import save_context

    return save_context.in_save_context() or module_on_stack(_KERAS_EXPORT_MODULE)


def check_export_format():
    """Every export format of Keras's TF backend can express the layer."""


def export_unrolls_stock_loop(sequences):
    """Whether the stock loop, where the layer exports it, should be unrolled.

    Keras's TF step loop is a `tf.while_loop` over TensorLists, which the
    OpenVINO converter cannot convert and LiteRT runs only with Flex ops at
    a dynamic batch size. Unrolled over a static number of timesteps it is
    plain ops. So: True for a `keras.src.export.litert` or
    `keras.src.export.openvino` trace with T known; ONNX and SavedModels keep
    the loop (tf2onnx writes it as one ONNX `Loop`).
    """
    return sequences.shape[1] is not None and module_on_stack(
        _LITERT_EXPORT_MODULE, _OPENVINO_EXPORT_MODULE)


def export_sequence(x, kernel, recurrent_kernel, bias, h0, c0, go_backwards):
    """The LSTM (tanh, sigmoid, with bias, no mask) as TF ops that converters recognize.

    The recurrence runs in a `tf.function` with the attributes of Keras 2's
    "composite" LSTM (`api_implements: lstm_<id>`, `time_major`,
    `go_backwards`; 6 arguments, 5 results), whose body is Keras's own TF step
    loop (`keras.src.backend.tensorflow.rnn.rnn`) on the cell's arithmetic. So
    a SavedModel holds plain TF ops, tf2onnx rewrites the loop to ONNX `LSTM`
    nodes, OpenVINO converts it, and the TFLite converter fuses the function
    to its builtin `UNIDIRECTIONAL_SEQUENCE_LSTM` where the batch size is
    static. With a dynamic batch the converter keeps the body; for LiteRT
    (a `keras.src.export.litert` frame on the stack) and a static number of
    timesteps, the body is unrolled, so the `.tflite` file needs builtin ops
    only (no Flex delegate). Other formats keep the loop: an unrolled body
    would lose ONNX its `LSTM` nodes.

    Args:
        x: [N, T, C] float32 inputs, in the original order.
        kernel, recurrent_kernel, bias: the cell's weights, Keras layout.
        h0, c0: [N, H] initial states.
        go_backwards: whether the steps run from the last one.

    Returns:
        `(outputs [N, T, H] in the order the steps ran, h_n, c_n)`.
    """
    unroll = (x.shape[0] is None and x.shape[1] is not None
              and module_on_stack(_LITERT_EXPORT_MODULE))
    composite = _composite_lstm(bool(go_backwards), bool(unroll))
    _, outputs, h_n, c_n, _ = composite(
        tf.convert_to_tensor(x, _F32), tf.convert_to_tensor(h0, _F32),
        tf.convert_to_tensor(c0, _F32), *(tf.convert_to_tensor(w, _F32)
                                          for w in (kernel, recurrent_kernel, bias)))
    return outputs, h_n, c_n


def _composite_lstm(go_backwards, unroll):
    """A new `tf.function` with Keras 2's composite LSTM signature and attributes.

    The TFLite converter (`CheckFusableKerasLstm`) fuses a function whose
    `api_implements` starts with "lstm_" and which takes `(inputs, init_h,
    init_c, kernel, recurrent_kernel, bias)` and returns `(last_output,
    outputs, h, c, runtime)`; the id keeps each layer's function distinct.
    """
    import uuid

    from keras import ops
    from keras.activations import sigmoid, tanh
    from keras.src.backend.tensorflow.rnn import rnn

    def standard_lstm(inputs, init_h, init_c, kernel, recurrent_kernel, bias):
        def step(x_t, states):
            # The stock LSTMCell's ops (Keras ops, Keras activations): tf2onnx's
            # LSTM rewriter matches this pattern, tf.* spellings of it it misses.
            h_tm1, c_tm1 = states
            z = ops.add(ops.add(ops.matmul(x_t, kernel), ops.matmul(h_tm1, recurrent_kernel)),
                        bias)
            z_i, z_f, z_c, z_o = ops.split(z, 4, axis=1)
            c = sigmoid(z_f) * c_tm1 + sigmoid(z_i) * tanh(z_c)
            h = sigmoid(z_o) * tanh(c)
            return h, [h, c]

        last, outputs, (h, c) = rnn(step, inputs, [init_h, init_c], go_backwards=go_backwards,
                                    unroll=unroll, input_length=inputs.shape[1],
                                    return_all_outputs=True)
        return last, outputs, h, c, tf.constant(0.0)

    return tf.function(standard_lstm, autograph=False, experimental_attributes={
        "api_implements": f"lstm_{uuid.uuid4()}",
        "api_preferred_device": "CPU",
        "time_major": False,
        "go_backwards": go_backwards,
    })

