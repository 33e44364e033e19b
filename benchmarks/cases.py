"""The CPU benchmark cases: shapes, and one timed callable per framework.

Each `make_*` builds a layer with the same weights on every framework, checks
its outputs before anything is timed, and returns `run(x)` that blocks until
the result is computed. Frameworks are imported lazily so that each one can be
timed in a process of its own.
"""

import numpy as np

from fusedlstm.testing import reference

# name: (N, T, C, H)
SHAPES = {"S1": (1, 100, 32, 128), "S2": (32, 100, 64, 256), "S3": (128, 50, 128, 512)}
MODES = ("fwd", "train")
# Cases where the stock layer leaves its plain loop; torch.nn.LSTM has no equivalent.
CASES = ("plain", "mask_left", "mask_holes", "recurrent_dropout")


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
    elif case == "mask_holes":
        mask = rng.random((N, T)) > 0.1
    return x, mask, weights


class KernelProblem:
    """The fused CPU kernels' host drivers at one shape, on NumPy arrays, batch-major
    (no mask, tanh and sigmoid), with what the backward calls need already saved: the
    whole layer, the input projection and the weight gradients included.

    The forward outputs are checked against the float64 reference first.
    """

    def __init__(self, shape):
        from fusedlstm.kernels import cpu
        from fusedlstm.kernels.gates import ACTIVATION_CODES

        x, _, (kernel, recurrent_kernel, bias) = problem(SHAPES[shape], "plain")
        self.cpu = cpu
        self.x = x
        self.kernel, self.recurrent_kernel, self.bias = kernel, recurrent_kernel, bias
        N, T, _ = self.x.shape
        H = recurrent_kernel.shape[0]
        self.zeros = np.zeros((N, H), np.float32)
        self.codes = (ACTIVATION_CODES["tanh"], ACTIVATION_CODES["sigmoid"])
        self.outputs, _, _, self.saved = self.forward(training=True)
        check_against_reference(self.outputs, x, None, [kernel, recurrent_kernel, bias])
        self.d_outputs = 2 * self.outputs

    def forward(self, training):
        return self.cpu.forward(self.x, self.kernel, self.bias, self.recurrent_kernel,
                                self.zeros, self.zeros, None, None, None, *self.codes, False,
                                training)

    def backward(self):
        return self.cpu.backward(self.x, self.kernel, self.recurrent_kernel, None, None, None,
                                 *self.codes, False, self.saved, self.d_outputs, self.zeros,
                                 self.zeros)


def make_keras(layer_class, shape, mode, case):
    """A Keras layer (stock or fused) called inside `tf.function`."""
    import tensorflow as tf

    x, mask, weights = problem(shape, case)
    kwargs = {"recurrent_dropout": 0.2} if case == "recurrent_dropout" else {}
    layer = layer_class(shape[3], return_sequences=True, **kwargs)
    layer.build(x.shape)
    layer.set_weights(weights)
    x_t = tf.constant(x)
    mask_t = None if mask is None else tf.constant(mask)
    training = mode == "train"

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
    step = train_step if training else forward
    return lambda: tf.nest.map_structure(lambda t: t.numpy(), step(x_t))


def make_torch(shape, mode, case):
    """`torch.nn.LSTM` (oneDNN on the CPU) with the same weights."""
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


def check_against_reference(outputs, x, mask, weights):
    want = reference.lstm_forward(x, *weights, mask=mask)[0]
    error = np.abs(outputs - want).max()
    if error > 1e-4:
        raise AssertionError(f"outputs differ from the float64 reference by {error:.3g}")
