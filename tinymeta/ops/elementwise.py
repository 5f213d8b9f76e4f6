"""Elementwise math. Rules that reuse the output (exp, sqrt, tanh, sigmoid)
read it from ``self.output`` instead of recomputing it."""

from __future__ import annotations

import numpy as np

from tinymeta import kernels
from tinymeta.function import Function, arrays_only_on_host
from tinymeta.tensor import Tensor, constant


class Exp(Function):
    """y = exp(x);  gx = gy * y."""

    saves_output = True  # backward reads self.output

    saves_inputs = False

    def forward(self, x):
        return self.xp.exp(x)

    def backward(self, gy):
        return gy * self.output


class Log(Function):
    """y = log(x);  gx = gy / x."""

    def forward(self, x):
        return self.xp.log(x)

    def backward(self, gy):
        (x,) = self.inputs
        return gy / x


class Sqrt(Function):
    """y = sqrt(x);  gx = gy / (2 y)."""

    saves_output = True  # backward reads self.output

    saves_inputs = False

    def forward(self, x):
        return self.xp.sqrt(x)

    def backward(self, gy):
        return gy / (2.0 * self.output)


class Abs(Function):
    """y = |x|;  gx = gy * sign(x)  (sign(0) = 0, so the gradient at 0 is 0)."""

    def forward(self, x):
        return self.xp.abs(x)

    def backward(self, gy):
        (x,) = self.inputs
        return gy * constant(self.xp.sign(x.data))


class Sin(Function):
    """y = sin(x);  gx = gy * cos(x)."""

    def forward(self, x):
        return self.xp.sin(x)

    def backward(self, gy):
        (x,) = self.inputs
        return gy * cos(x)


class Cos(Function):
    """y = cos(x);  gx = -gy * sin(x)."""

    def forward(self, x):
        return self.xp.cos(x)

    def backward(self, gy):
        (x,) = self.inputs
        return -gy * sin(x)


class Tanh(Function):
    """y = tanh(x);  gx = gy * (1 - y**2)."""

    saves_output = True  # backward reads self.output

    saves_inputs = False

    def forward(self, x):
        return self.xp.tanh(x)

    def backward(self, gy):
        return TanhGrad.apply(self.output, gy)


class TanhGrad(Function):
    """gx = gy * (1 - y**2), fused into one node;  d/dy = -2 y gy, d/dgy = 1 - y**2."""

    def forward(self, y, gy):
        return gy * (1 - y * y)

    def backward(self, ggx):
        y, gy = self.inputs
        g_y = TanhGradGrad.apply(y, gy, ggx) if self.needs_input_grad[0] else None
        # ggx * (1 - y**2) is this op's own forward: one node instead of three
        g_gy = TanhGrad.apply(y, ggx) if self.needs_input_grad[1] else None
        return g_y, g_gy


class TanhGradGrad(Function):
    """y = -2 a b c, TanhGrad's derivative in y (a = y, b = gy, c = ggx) as one node;
    ga = -2 b c g, gb = -2 a c g, gc = -2 a b g: the same op on the other two and g."""

    def forward(self, a, b, c):
        return -2.0 * a * b * c

    def backward(self, g):
        a, b, c = self.inputs
        need_a, need_b, need_c = self.needs_input_grad
        ga = TanhGradGrad.apply(b, c, g) if need_a else None
        gb = TanhGradGrad.apply(a, c, g) if need_b else None
        gc = TanhGradGrad.apply(a, b, g) if need_c else None
        return ga, gb, gc


class Sigmoid(Function):
    """y = 1 / (1 + exp(-x));  gx = gy * y * (1 - y)."""

    saves_output = True  # backward reads self.output

    saves_inputs = False

    def forward(self, x):
        # tanh form: no overflow of exp(-x) for very negative x.
        return 0.5 * (self.xp.tanh(0.5 * x) + 1)

    def backward(self, gy):
        y = self.output
        return gy * (y * (1.0 - y))


class Relu(Function):
    """y = max(x, 0);  gx = gy * [x > 0]  (the derivative at 0 is taken as 0)."""

    def forward(self, x):
        if type(x) is np.ndarray and x.size < _KERNEL_SIZE:
            return np.maximum(x, 0)  # the kernel's reference, what it computes at this size
        return kernels.relu_forward(x)

    def backward(self, gy):
        (x,) = self.inputs
        return _relu_grad(gy, x)


class ReluGrad(Function):
    """gx = gy * [x > 0], the ReLU's backward as one op;  ggy = ReluGrad(ggx, x), and no
    gradient for x (the mask [x > 0] is flat wherever it is differentiable).

    One kernel pass (tinymeta.kernels.relu_backward) instead of a mask array and a multiply.
    """

    def forward(self, gy, x):
        return _relu_grad_array(gy, x)

    def backward(self, ggx):
        _, x = self.inputs
        return _relu_grad(ggx, x), None


def _relu_grad(gy, x):
    """ReluGrad.apply(gy, x); its kernel call alone where nothing would record (see
    function.arrays_only_on_host)."""
    if arrays_only_on_host(gy, x):
        return Tensor._wrap(_relu_grad_array(gy._data, x._data))
    return ReluGrad.apply(gy, x)


# Below this many elements tinymeta.kernels' ReLU loops hand the array to their reference
# formulas (np.maximum(x, 0), gy * (x > 0)) after several Python calls of dispatch (about
# 2 us, more than the formula on a MAML layer's activations): the ops write them directly.
_KERNEL_SIZE = 4096


def _relu_grad_array(gy, x):
    if (
        type(gy) is np.ndarray
        and type(x) is np.ndarray
        and gy.size < _KERNEL_SIZE
        and gy.shape == x.shape  # (the kernel names a mismatch in its error)
    ):
        return gy * (x > 0)
    return kernels.relu_backward(gy, x)


def exp(x):
    return Exp.apply(x)


def log(x):
    return Log.apply(x)


def sqrt(x):
    return Sqrt.apply(x)


def abs(x):  # noqa: A001 - mirrors numpy.abs
    return Abs.apply(x)


def sin(x):
    return Sin.apply(x)


def cos(x):
    return Cos.apply(x)


def tanh(x):
    return Tanh.apply(x)


def sigmoid(x):
    return Sigmoid.apply(x)


def relu(x):
    return Relu.apply(x)
