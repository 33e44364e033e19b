"""PyTorch glue: the fused LSTM sequence as a `torch.autograd.Function`.

CPU tensors reach the `njit` kernels as NumPy views that share their memory.
CUDA tensors reach the CUDA kernels as they are (CUDA array interface),
launched on PyTorch's current stream so that nothing waits on the host. The
projection, the inputs' gradient and the weight gradients run as PyTorch
matmuls (`fusedlstm.backends.projection`) on either device.

Keras first calls layers on "meta" tensors to infer shapes: those calls get
empty meta outputs and run no kernel. When the forward pass ran without saving
(inference), a gradient request recomputes it with saving.

The op has no second-order gradient: a backward pass with `create_graph=True`
(gradient penalties, MAML) raises a `RuntimeError` that names
`use_fused=False`, under which the stock layer differentiates twice.
"""

import contextlib

import torch

from fusedlstm.backends import projection
from fusedlstm.kernels import cpu
from fusedlstm.kernels.select import select_kernels


def lstm_sequence(x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask,
                  recurrent_mask, config):
    """See `fusedlstm.ops.lstm_sequence`."""
    tensors = (x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask, recurrent_mask)
    if any(t is not None and t.is_meta for t in tensors):
        return _meta_outputs(x, recurrent_kernel)
    return _FusedLSTM.apply(*tensors, config)


class _FusedLSTM(torch.autograd.Function):
    """`(outputs, h_n, c_n)`, differentiable in x, the three weights, h0 and c0."""

    @staticmethod
    def forward(ctx, x, kernel, bias, recurrent_kernel, h0, c0, mask, input_mask,
                recurrent_mask, config):
        inputs = (x, kernel, bias, recurrent_kernel, h0, c0)
        masks = (mask, input_mask, recurrent_mask)
        outputs, h_n, c_n, saved = _forward(inputs, masks, config, config.training)
        ctx.config = config
        ctx.save_for_backward(*inputs, *masks, *(saved or ()))
        return outputs, h_n, c_n

    @staticmethod
    def backward(ctx, d_outputs, d_h_n, d_c_n):
        if torch.is_grad_enabled():  # create_graph=True: autograd records this backward
            raise RuntimeError(
                "fusedlstm.LSTM has no second-order gradient on the fused path: its "
                "backward pass is a kernel that autograd cannot differentiate, so a "
                "gradient taken with create_graph=True (a gradient penalty, MAML) would "
                "miss every term through it. Construct the layer with use_fused=False "
                "(the stock loop, the same weights) to differentiate twice.")
        config = ctx.config
        tensors = ctx.saved_tensors
        inputs, masks, saved = tensors[:6], tensors[6:9], tensors[9:]
        if not config.training:
            saved = _forward(inputs, masks, config, save=True)[3]
        grads = _gradients(inputs, masks, config, saved, (d_outputs, d_h_n, d_c_n))
        return (*grads, None, None, None, None)


def _forward(inputs, masks, config, save):
    """Projects and runs the forward kernel.

    Returns:
        `(outputs, h_n, c_n, saved)` as tensors on the inputs' device, with
        `saved = (h_seq, c_seq, gates)` when `save`, else None.
    """
    x, kernel, bias, recurrent_kernel, h0, c0 = inputs
    mask, input_mask, recurrent_mask = masks
    xw = projection.input_projection(x, kernel, bias, input_mask)
    kernels = _kernels_for(x)
    with _launch_on(kernels, x.device) as options:
        outputs, h_n, c_n, saved = kernels.forward(
            *_kernel_arrays(kernels, xw, recurrent_kernel, h0, c0, mask, recurrent_mask),
            config.activation, config.recurrent_activation, config.zero_output_for_mask, save,
            **options)
    outputs, h_n, c_n = _to_torch((outputs, h_n, c_n), x.device)
    return outputs, h_n, c_n, (_to_torch(saved, x.device) if save else None)


def _gradients(inputs, masks, config, saved, d_results):
    """`(d_x, d_kernel, d_bias, d_recurrent_kernel, d_h0, d_c0)` as tensors."""
    x, kernel, _, recurrent_kernel, _, _ = inputs
    mask, input_mask, recurrent_mask = masks
    codes = (config.activation, config.recurrent_activation, config.zero_output_for_mask)
    h_in, c_seq, gates = saved
    kernels = _kernels_for(x)
    with _launch_on(kernels, x.device) as options:
        results = kernels.backward(
            *_kernel_arrays(kernels, recurrent_kernel, mask, recurrent_mask), *codes,
            tuple(_kernel_arrays(kernels, h_in, c_seq, gates)),
            *_kernel_arrays(kernels, *d_results), **options)
    d_xw, d_h0, d_c0 = _to_torch(results, x.device)
    return (projection.input_grad(d_xw, kernel, input_mask),
            projection.gate_weight_grad(x, d_xw, input_mask), d_xw.sum((0, 1)),
            projection.gate_weight_grad(h_in, d_xw, recurrent_mask), d_h0, d_c0)


def _kernels_for(tensor):
    return select_kernels(tensor.device.type == "cuda")


def _kernel_arrays(kernels, *tensors):
    """What `kernels` takes: NumPy views for the CPU kernels, else device tensors.

    Tensors that require grad refuse NumPy and CUDA-array export: detach them.
    The kernels take dense arrays (`kernels.checks`): broadcast states and
    expanded gradients are copied.
    """
    if kernels is cpu:
        return [None if t is None else t.detach().cpu().contiguous().numpy() for t in tensors]
    return [None if t is None else _device_or_numpy(t.detach()) for t in tensors]


def _device_or_numpy(tensor):
    return tensor.contiguous() if tensor.is_cuda else tensor.numpy()


@contextlib.contextmanager
def _launch_on(kernels, device):
    """Yields the kernels' launch options for tensors on `device`.

    CUDA kernels launch on the tensors' GPU (Numba launches on its current
    device) and on PyTorch's current stream there, so no host sync is needed.
    """
    if kernels is cpu or device.type != "cuda":
        yield {}
        return
    from numba import cuda

    with cuda.gpus[device.index]:
        yield {"stream": torch.cuda.current_stream(device).cuda_stream}


def _to_torch(arrays, device):
    """Wraps NumPy or CUDA arrays as tensors on `device`, without copies where they are."""
    return tuple(torch.as_tensor(a, device=device) for a in arrays)


def _meta_outputs(x, recurrent_kernel):
    """Empty meta tensors shaped like the outputs: [N, T, H], [N, H], [N, H]."""
    batch, steps, units = x.shape[0], x.shape[1], recurrent_kernel.shape[0]
    options = {"dtype": torch.float32, "device": "meta"}
    return (torch.empty((batch, steps, units), **options),
            torch.empty((batch, units), **options),
            torch.empty((batch, units), **options))


# ---------------------------------------------------------------------------
# Export: what the layer traces while an artifact is being written.

def tracing_for_export(sequences):
    """Whether torch is tracing the layer for an artifact that leaves the process.

    The fused op is an `autograd.Function` around a Numba kernel, which
    neither the ONNX exporter nor `torch.export` can carry into a graph. Keras
    sets no flag of its own during `keras.Model.export`
    (`keras/src/export/onnx.py`, `torch.py`, `openvino.py`), but torch does:
    `torch.onnx.is_in_onnx_export()` (TorchScript-based ONNX export),
    `torch.jit.is_tracing()` (`torch.jit.trace`, which the OpenVINO converter
    uses) and `torch.compiler.is_exporting()` (`torch.export`, dynamo-based
    ONNX export). Eager calls, `fit` and `predict` are none of these.
    """
    del sequences
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return bool(torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or exporting())


def check_export_format():
    """Every export format of Keras's torch backend can express the layer."""


def export_unrolls_stock_loop(sequences):
    """False: torch's exporters trace the stock loop step by step already."""
    del sequences
    return False


def export_sequence(x, kernel, recurrent_kernel, bias, h0, c0, go_backwards):
    """The LSTM (tanh, sigmoid, with bias, no mask) as torch's own `aten::lstm`.

    The call Keras's torch backend makes for cuDNN
    (`keras/src/backend/torch/rnn.py`, `_cudnn_lstm`): `torch._VF.lstm`,
    which the ONNX exporter writes as one ONNX `LSTM` node and `torch.export`
    keeps as `aten.lstm`. torch's gate order (i, f, g, o) is Keras's
    (i, f, c, o): the matrices are transposed, the bias goes to `b_ih`.

    Args:
        x: [N, T, C] float32 inputs, in the original order.
        kernel, recurrent_kernel, bias: the cell's weights, Keras layout.
        h0, c0: [N, H] initial states.
        go_backwards: whether the steps run from the last one.

    Returns:
        `(outputs [N, T, H] in the order the steps ran, h_n, c_n)`.
    """
    # Keras variables hold their torch tensor in `.value`.
    kernel, recurrent_kernel, bias = (getattr(w, "value", w)
                                      for w in (kernel, recurrent_kernel, bias))
    if go_backwards:
        x = torch.flip(x, [1])
    params = [kernel.t(), recurrent_kernel.t(), bias, torch.zeros_like(bias)]
    outputs, h_n, c_n = torch._VF.lstm(
        x, (h0.unsqueeze(0), c0.unsqueeze(0)), params,
        True,  # has_biases
        1,  # num_layers
        0.0,  # dropout
        False,  # training
        False,  # bidirectional
        True)  # batch_first
    return outputs, h_n.squeeze(0), c_n.squeeze(0)
