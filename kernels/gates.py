"""LSTM gate math, written once and compiled twice: `njit` for the CPU kernels
and `cuda.jit(device=True)` for the CUDA kernels.

Everything here is plain scalar Python on float32 values. Constants are
`np.float32` module globals: a Python float literal would turn the CUDA
math into float64.

Activation codes name the Keras activations the kernels can fuse. Each one's
derivative is written on its output `y`, so the backward pass never needs the
pre-activation values.
"""

import types

import numpy as np

TANH = 0
SIGMOID = 1
HARD_SIGMOID = 2
RELU = 3
LINEAR = 4
SOFTSIGN = 5

ACTIVATION_CODES = {
    "tanh": TANH,
    "sigmoid": SIGMOID,
    "hard_sigmoid": HARD_SIGMOID,
    "relu": RELU,
    "linear": LINEAR,
    "softsign": SOFTSIGN,
}

_ZERO = np.float32(0.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_SIXTH = np.float32(1.0 / 6.0)

# Eigen's rational tanh (ptanh_float): max abs error about 3e-7 on float32.
# Written out because libm's tanh is a scalar call that LLVM cannot vectorize.
_TANH_CLAMP = np.float32(7.90531110763549805)
_A1 = np.float32(4.89352455891786e-03)
_A3 = np.float32(6.37261928875436e-04)
_A5 = np.float32(1.48572235717979e-05)
_A7 = np.float32(5.12229709037114e-08)
_A9 = np.float32(-8.60467152213735e-11)
_A11 = np.float32(2.00018790482477e-13)
_A13 = np.float32(-2.76076847742355e-16)
_B0 = np.float32(4.89352518554385e-03)
_B2 = np.float32(2.26843463243900e-03)
_B4 = np.float32(1.18534705686654e-04)
_B6 = np.float32(1.19825839466702e-06)


def fast_tanh(x):
    # Comparisons (not min/max) so that NaN passes through unchanged.
    if x > _TANH_CLAMP:
        x = _TANH_CLAMP
    if x < -_TANH_CLAMP:
        x = -_TANH_CLAMP
    x2 = x * x
    p = x2 * _A13 + _A11
    p = p * x2 + _A9
    p = p * x2 + _A7
    p = p * x2 + _A5
    p = p * x2 + _A3
    p = p * x2 + _A1
    p = p * x
    q = x2 * _B6 + _B4
    q = q * x2 + _B2
    q = q * x2 + _B0
    return p / q


def activate(code, x):
    """Applies the activation named by `code` to the float32 scalar `x`."""
    if code == TANH:
        return fast_tanh(x)
    if code == SIGMOID:
        return _HALF + _HALF * fast_tanh(_HALF * x)
    if code == HARD_SIGMOID:
        y = x * _SIXTH + _HALF
        if y < _ZERO:
            y = _ZERO
        if y > _ONE:
            y = _ONE
        return y
    if code == RELU:
        return _ZERO if x < _ZERO else x
    if code == SOFTSIGN:
        return x / (_ONE + abs(x))
    return x


def activation_grad(code, y):
    """Derivative of the activation `code` at the point whose output is `y`."""
    if code == TANH:
        return _ONE - y * y
    if code == SIGMOID:
        return y * (_ONE - y)
    if code == HARD_SIGMOID:
        return _SIXTH if (y > _ZERO and y < _ONE) else _ZERO
    if code == RELU:
        return _ONE if y > _ZERO else _ZERO
    if code == SOFTSIGN:
        s = _ONE - abs(y)
        return s * s
    return _ONE


def cell_forward(zi, zf, zc, zo, c_prev, act, ract):
    """One LSTM cell update from the four pre-activations.

    Returns:
        `(i, f, g, o, c, h)`: the gate activations, the new carry and the new
        hidden state.
    """
    i = activate(ract, zi)
    f = activate(ract, zf)
    g = activate(act, zc)
    o = activate(ract, zo)
    c = f * c_prev + i * g
    h = o * activate(act, c)
    return i, f, g, o, c, h


def cell_backward(i, f, g, o, c_prev, c, dh, dc, act, ract):
    """Gradients of one cell update.

    Args:
        i, f, g, o: the gate activations saved by the forward pass.
        c_prev, c: the carry before and after the step.
        dh, dc: the gradients reaching the new hidden state and new carry.

    Returns:
        `(dzi, dzf, dzc, dzo, dc_prev)`: gradients of the four
        pre-activations and of the previous carry.
    """
    ac = activate(act, c)
    dc = dc + dh * o * activation_grad(act, ac)
    dzi = dc * g * activation_grad(ract, i)
    dzf = dc * c_prev * activation_grad(ract, f)
    dzc = dc * i * activation_grad(act, g)
    dzo = dh * ac * activation_grad(ract, o)
    return dzi, dzf, dzc, dzo, dc * f


_LEAF_FUNCTIONS = ("fast_tanh", "activate", "activation_grad")
_GATE_FUNCTIONS = _LEAF_FUNCTIONS + ("cell_forward", "cell_backward")


def compile_gates(jit, leaf_jit=None):
    """Compiles the gate functions for one target.

    Each function is rebuilt over a namespace in which the functions it calls
    are already compiled for the same target, so one Python source serves both
    `njit` and `cuda.jit(device=True)`.

    Args:
        jit: a decorator such as `numba.njit(inline="always")`.
        leaf_jit: the decorator of the activation functions, if not `jit`. On
            the CPU, Numba inlining them (`inline="always"`) at every call site
            costs seconds of compile time; compiled once and inlined by LLVM
            where the activation code is a constant, they fold to one branch.

    Returns:
        A namespace with one compiled function per name in `_GATE_FUNCTIONS`.
    """
    namespace = dict(globals())
    for name in _GATE_FUNCTIONS:
        source = globals()[name]
        decorator = leaf_jit if leaf_jit is not None and name in _LEAF_FUNCTIONS else jit
        namespace[name] = decorator(types.FunctionType(source.__code__, namespace, name))
    return types.SimpleNamespace(**{name: namespace[name] for name in _GATE_FUNCTIONS})
