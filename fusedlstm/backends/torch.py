"""PyTorch glue: the fused LSTM sequence as a `torch.autograd.Function`.

CPU tensors reach the CPU drivers (`kernels.cpu`) as NumPy views that share
their memory: one call per direction runs the whole layer (x, the weights and
the masks in; the outputs, and backward every gradient, out), with no PyTorch
op around it. CUDA tensors reach the CUDA kernels as they are (CUDA array
interface), launched on PyTorch's current stream so that nothing waits on the
host; there the projection, the inputs' gradient and the weight gradients run
as PyTorch matmuls (`fusedlstm.backends.projection`).

Keras first calls layers on "meta" tensors to infer shapes: those calls get
empty meta outputs and run no kernel. When the forward pass ran without saving
(inference), a gradient request recomputes it with saving.

The op has no second-order gradient: a backward pass with `create_graph=True`
(gradient penalties, MAML) raises a `RuntimeError` that names
`use_fused=False`, under which the stock layer differentiates twice.
"""

import contextlib

import numpy as np
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
        ctx.set_materialize_grads(False)  # None gradients become zeros in NumPy
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
    """Runs the forward kernel: `(outputs, h_n, c_n, saved)` as tensors on the
    inputs' device, with `saved = (h_in, c_seq, gates)` when `save`, else None."""
    device = inputs[0].device
    if _kernels_for(inputs[0]) is cpu:
        results = cpu.forward(*_numpy(*inputs, *masks), *_codes(config), save)
        return (*_to_torch(results[:3], device), _to_torch(results[3], device) if save else None)
    return _cuda_forward(inputs, masks, config, save)


def _gradients(inputs, masks, config, saved, d_results):
    """`(d_x, d_kernel, d_bias, d_recurrent_kernel, d_h0, d_c0)` as tensors."""
    x, kernel, _, recurrent_kernel, h0, _ = inputs
    if _kernels_for(x) is cpu:
        d_results = [np.zeros(like.shape, np.float32) if d is None else d
                     for d, like in zip(_numpy(*d_results), (saved[0], h0, h0))]
        d_x, d_kernel, d_recurrent_kernel, d_bias, d_h0, d_c0 = _to_torch(cpu.backward(
            *_numpy(x, kernel, recurrent_kernel, *masks), *_codes(config),
            tuple(_numpy(*saved)), *d_results), x.device)
        return d_x, d_kernel, d_bias, d_recurrent_kernel, d_h0, d_c0
    return _cuda_gradients(inputs, masks, config, saved, d_results)


def _codes(config):
    return config.activation, config.recurrent_activation, config.zero_output_for_mask


def _numpy(*tensors):
    """NumPy views of CPU tensors (None stays None): what the CPU drivers take.

    Tensors that require grad refuse NumPy export: detached first. The
    drivers take dense arrays (`kernels.checks`): broadcast states and
    expanded gradients are copied, and so are CUDA tensors where the CUDA
    kernels cannot run.
    """
    return [None if t is None else t.detach().cpu().contiguous().numpy() for t in tensors]


def _cuda_forward(inputs, masks, config, save):
    """Projects in PyTorch and runs the forward CUDA kernel."""
    x, kernel, bias, recurrent_kernel, h0, c0 = inputs
    mask, input_mask, recurrent_mask = masks
    xw = projection.input_projection(x, kernel, bias, input_mask)
    kernels = _kernels_for(x)
    with _launch_on(x.device) as options:
        outputs, h_n, c_n, saved = kernels.forward(
            *_cuda_arrays(xw, recurrent_kernel, h0, c0, mask, recurrent_mask),
            *_codes(config), save, **options)
    outputs, h_n, c_n = _to_torch((outputs, h_n, c_n), x.device)
    return outputs, h_n, c_n, (_to_torch(saved, x.device) if save else None)


def _cuda_gradients(inputs, masks, config, saved, d_results):
    """The backward CUDA kernel, then the weight gradients in PyTorch."""
    x, kernel, _, recurrent_kernel, h0, _ = inputs
    mask, input_mask, recurrent_mask = masks
    d_results = [torch.zeros_like(like) if d is None else d
                 for d, like in zip(d_results, (saved[0], h0, h0))]
    h_in, c_seq, gates = saved
    kernels = _kernels_for(x)
    with _launch_on(x.device) as options:
        results = kernels.backward(
            *_cuda_arrays(recurrent_kernel, mask, recurrent_mask), *_codes(config),
            tuple(_cuda_arrays(h_in, c_seq, gates)),
            *_cuda_arrays(*d_results), **options)
    d_xw, d_h0, d_c0 = _to_torch(results, x.device)
    return (projection.input_grad(d_xw, kernel, input_mask),
            projection.gate_weight_grad(x, d_xw, input_mask), d_xw.sum((0, 1)),
            projection.gate_weight_grad(h_in, d_xw, recurrent_mask), d_h0, d_c0)


def _kernels_for(tensor):
    return select_kernels(tensor.device.type == "cuda")


def _cuda_arrays(*tensors):
    """What the CUDA kernels take: device tensors, or NumPy views of CPU tensors.

    Tensors that require grad refuse CUDA-array export: detach them.
    """
    return [None if t is None else _device_or_numpy(t.detach()) for t in tensors]


def _device_or_numpy(tensor):
    return tensor.contiguous() if tensor.is_cuda else tensor.numpy()


@contextlib.contextmanager
def _launch_on(device):
    """Yields the kernels' launch options for tensors on `device`.

    CUDA kernels launch on the tensors' GPU (Numba launches on its current
    device) and on PyTorch's current stream there, so no host sync is needed.
    """
    if device.type != "cuda":
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
