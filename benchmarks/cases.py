"""The CPU benchmark cases: shapes, rows, FLOPs, and one timed callable per implementation.

Each `make_*` builds an LSTM with the same weights on every framework, checks
its outputs against the float64 reference before anything is timed, and returns
`run()` that blocks until the result is computed. Frameworks are imported
lazily so that each one can be timed in a process of its own.

`FUSEDLSTM_BENCH_QUICK=1` (set by the runners' `--quick`) keeps every row but
shrinks the shapes and the rounds: a smoke test of the whole suite, not a timing.
"""

import os

import numpy as np

from fusedlstm.testing import reference

QUICK = os.environ.get("FUSEDLSTM_BENCH_QUICK") == "1"
# name: (N, T, C, H)
SHAPES = ({"S1": (1, 6, 4, 8), "S2": (4, 5, 8, 16), "S3": (8, 3, 16, 32)} if QUICK else
          {"S1": (1, 100, 32, 128), "S2": (32, 100, 64, 256), "S3": (128, 50, 128, 512)})
ROUNDS, WARMUP_ROUNDS = (2, 1) if QUICK else (7, 2)
MODES = ("fwd", "train")
# Cases where the stock layer leaves its plain loop, timed at S2 on the TensorFlow backend
# for the two Keras layers only (torch.nn.LSTM and ONNX Runtime have no equivalent).
SLOW_PATH_CASES = ("mask_left", "recurrent_dropout")
SLOW_PATH_SHAPE = "S2"
ROWS = ([(shape, mode, "plain") for shape in sorted(SHAPES) for mode in MODES]
        + [(SLOW_PATH_SHAPE, mode, case) for case in SLOW_PATH_CASES for mode in MODES])
RECURRENT_DROPOUT = 0.2


def layer_flops(shape, mode):
    """FLOPs of the layer's GEMMs at `shape` (N, T, C, H): 2 N T 4H (C + H) forward; a
    training step (forward, inputs' and recurrent gradients, weight gradients) does three
    times as many."""
    N, T, C, H = shape
    forward = 2 * N * T * 4 * H * (C + H)
    return forward if mode == "fwd" else 3 * forward


def problem(shape, case):
    """Inputs, a [N, T] mask or None, and float32 weights, from a fixed seed."""
    N, T, C, H = shape
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, T, C)).astype("float32")
    weights = [rng.normal(0, 1 / np.sqrt(C), (C, 4 * H)).astype("float32"),
               rng.normal(0, 1 / np.sqrt(H), (H, 4 * H)).astype("float32"),
               rng.normal(0, 0.1, 4 * H).astype("float32")]
    mask = None
    if case == "mask_left":
        lengths = rng.integers(T // 2, T + 1, size=N)
        mask = np.arange(T)[None, :] >= (T - lengths)[:, None]
    return x, mask, weights


def load_fused_kernels(training=True):
    """Compiles (or loads from the disk cache) the fused CPU kernels of tanh / sigmoid in
    this process, so that no timed call waits for them."""
    from fusedlstm.kernels import cpu
    from fusedlstm.kernels.gates import ACTIVATION_CODES

    cpu.warm_up(ACTIVATION_CODES["tanh"], ACTIVATION_CODES["sigmoid"], training)


class KernelProblem:
    """The fused CPU kernels' host drivers at one shape, on NumPy arrays, batch-major
    (no mask, no dropout, tanh and sigmoid): one call per direction owns the whole layer
    (input projection, recurrence and, backward, every gradient).

    The forward outputs are checked against the float64 reference first.
    """

    def __init__(self, shape):
        from fusedlstm.kernels import cpu
        from fusedlstm.kernels.gates import ACTIVATION_CODES

        self.x, _, (self.kernel, self.recurrent_kernel, self.bias) = problem(SHAPES[shape],
                                                                            "plain")
        self.cpu = cpu
        N, T, _ = self.x.shape
        H = self.recurrent_kernel.shape[0]
        self.zeros = np.zeros((N, H), np.float32)
        self.codes = (ACTIVATION_CODES["tanh"], ACTIVATION_CODES["sigmoid"])
        self.outputs, _, _, self.saved = self.forward(training=True)
        check_against_reference(self.outputs, self.x, None,
                                [self.kernel, self.recurrent_kernel, self.bias])
        self.d_outputs = 2 * self.outputs

    def forward(self, training):
        return self.cpu.forward(self.x, self.kernel, self.bias, self.recurrent_kernel,
                                self.zeros, self.zeros, None, None, None, *self.codes, False,
                                training)

    def backward(self, saved):
        return self.cpu.backward(self.x, self.kernel, self.recurrent_kernel, None, None, None,
                                 *self.codes, False, saved, self.d_outputs, self.zeros,
                                 self.zeros)

    def train_step(self):
        """Forward with saving, then backward: what a training step asks of the kernels."""
        return self.backward(self.forward(training=True)[3])


def keras_layer(layer_class, shape, case):
    """A built `layer_class` (stock or fused) holding the case's weights, and the case."""
    x, mask, weights = problem(shape, case)
    kwargs = {"recurrent_dropout": RECURRENT_DROPOUT} if case == "recurrent_dropout" else {}
    layer = layer_class(shape[3], return_sequences=True, **kwargs)
    layer.build(x.shape)
    layer.set_weights(weights)
    return layer, x, mask, weights


def make_keras_tensorflow(layer_class, shape, mode, case):
    """A Keras layer called inside `tf.function` (TensorFlow backend); the training step
    is the gradient of a sum of squares with respect to the three weights."""
    import tensorflow as tf

    layer, x, mask, weights = keras_layer(layer_class, shape, case)
    x_t = tf.constant(x)
    mask_t = None if mask is None else tf.constant(mask)

    @tf.function
    def forward(x):
        return layer(x, mask=mask_t, training=False)

    @tf.function
    def train_step(x):
        with tf.GradientTape() as tape:
            y = layer(x, mask=mask_t, training=True)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, layer.trainable_weights)

    check_against_reference(forward(x_t).numpy(), x, mask, weights)
    step = train_step if mode == "train" else forward
    return lambda: tf.nest.map_structure(lambda t: t.numpy(), step(x_t))


def make_keras_torch(layer_class, shape, mode, case):
    """A Keras layer called eagerly on the torch backend, as Keras's torch trainer does;
    the training step as on TensorFlow, by `torch.autograd.grad`."""
    import torch

    layer, x, mask, weights = keras_layer(layer_class, shape, case)
    x_t = torch.from_numpy(x)
    mask_t = None if mask is None else torch.from_numpy(mask)
    variables = [v.value for v in layer.trainable_weights]

    def forward():
        with torch.no_grad():
            return layer(x_t, mask=mask_t, training=False)

    def train_step():
        y = layer(x_t, mask=mask_t, training=True)
        return torch.autograd.grad((y * y).sum(), variables)

    check_against_reference(forward().numpy(), x, mask, weights)
    return train_step if mode == "train" else forward


def make_torch(shape, mode, case):
    """`torch.nn.LSTM` (oneDNN on the CPU) with the same weights, or None for a case it
    has no equivalent of."""
    import torch

    if case != "plain":
        return None
    x, _, (kernel, recurrent_kernel, bias) = problem(shape, case)
    lstm = torch.nn.LSTM(shape[2], shape[3], batch_first=True)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(kernel.T))
        lstm.weight_hh_l0.copy_(torch.from_numpy(recurrent_kernel.T))
        lstm.bias_ih_l0.copy_(torch.from_numpy(bias))
        lstm.bias_hh_l0.zero_()
    x_t = torch.from_numpy(x)
    with torch.no_grad():
        check_against_reference(lstm(x_t)[0].numpy(), x, None, [kernel, recurrent_kernel, bias])

    def forward():
        with torch.no_grad():
            return lstm(x_t)[0]

    def train_step():
        lstm.zero_grad(set_to_none=True)
        y = lstm(x_t)[0]
        (y * y).sum().backward()
        return lstm.weight_hh_l0.grad

    return train_step if mode == "train" else forward


# Keras's gate blocks are i, f, c, o; ONNX's are i, o, f, c.
ONNX_GATE_ORDER = (0, 3, 1, 2)


def onnx_gates(matrix, H):
    """`matrix` [..., 4H] with its gate blocks reordered from Keras's to ONNX's."""
    return np.concatenate([matrix[..., g * H:(g + 1) * H] for g in ONNX_GATE_ORDER], axis=-1)


def onnx_lstm_model(kernel, recurrent_kernel, bias):
    """One ONNX `LSTM` node (time-major X [T, N, C], Y [T, 1, N, H]) holding the Keras
    weights as initializers: W [1, 4H, C], R [1, 4H, H], B [1, 8H] (input then recurrent
    bias, the latter zero), gates reordered to ONNX's i, o, f, c."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    C, H = kernel.shape[0], recurrent_kernel.shape[0]
    initializers = [
        numpy_helper.from_array(onnx_gates(kernel, H).T[None].copy(), "W"),
        numpy_helper.from_array(onnx_gates(recurrent_kernel, H).T[None].copy(), "R"),
        numpy_helper.from_array(
            np.concatenate([onnx_gates(bias, H), np.zeros(4 * H, np.float32)])[None], "B")]
    node = helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y"], hidden_size=H)
    graph = helper.make_graph(
        [node], "lstm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, None, C])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1, None, H])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    onnx.checker.check_model(model)
    return model


def onnxruntime_session(model, threads):
    """An ONNX Runtime CPU session of `model` with `threads` intra-op threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


def make_onnxruntime(shape, mode, case, threads):
    """ONNX Runtime's own LSTM operator, inference only; None for training or another case."""
    if case != "plain" or mode != "fwd":
        return None
    x, _, weights = problem(shape, case)
    session = onnxruntime_session(onnx_lstm_model(*weights), threads)
    feed = {"X": np.ascontiguousarray(x.transpose(1, 0, 2))}

    def forward():
        return session.run(None, feed)[0]

    check_against_reference(forward()[:, 0].transpose(1, 0, 2), x, None, weights)
    return forward


def check_against_reference(outputs, x, mask, weights):
    want = reference.lstm_forward(x, *weights, mask=mask)[0]
    error = np.abs(outputs - want).max()
    if error > 1e-4:
        raise AssertionError(f"outputs differ from the float64 reference by {error:.3g}")
