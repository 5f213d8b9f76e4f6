"""+ - * / ** with NumPy broadcasting. Gradients are summed back to each
input's shape with ``sum_to``, the one reduction that undoes broadcasting."""

from __future__ import annotations

import numpy as np

from tinymeta.function import Function, arrays_only
from tinymeta.ops.elementwise import log
from tinymeta.ops.promotion import promote
from tinymeta.ops.selection import where
from tinymeta.ops.shape import sum_to
from tinymeta.tensor import Tensor


class _BroadcastShapes(Function):
    """A two-input op with NumPy broadcasting whose backward sums ``gy`` back to each input's
    shape: ``shapes`` is (a.shape, b.shape) when they differ, None when they are equal (the
    output, and so ``gy``, then has that shape). The common equal case stores nothing: a
    graph keeps every node's attributes until backward, and three tuples per node add up to
    many collections of the cyclic garbage collector in a MAML step."""

    saves_inputs = False
    shapes = None


class Add(_BroadcastShapes):
    """y = a + b;  ga = gy, gb = gy (summed to each shape)."""

    def forward(self, a, b):
        if a.shape != b.shape:  # (equal shapes are kept as None: see _BroadcastShapes)
            self.shapes = (a.shape, b.shape)
        return a + b

    def backward(self, gy):
        sa, sb = self.shapes or (gy.shape, gy.shape)
        return sum_to(gy, sa), sum_to(gy, sb)


class Sub(_BroadcastShapes):
    """y = a - b;  ga = gy, gb = -gy."""

    def forward(self, a, b):
        if a.shape != b.shape:  # (equal shapes are kept as None: see _BroadcastShapes)
            self.shapes = (a.shape, b.shape)
        return a - b

    def backward(self, gy):
        sa, sb = self.shapes or (gy.shape, gy.shape)
        ga = sum_to(gy, sa) if self.needs_input_grad[0] else None
        gb = _negated(sum_to(gy, sb)) if self.needs_input_grad[1] else None
        return ga, gb


def _negated(g):
    """-g: Neg's array call directly where nothing records (see arrays_only), else a node."""
    if arrays_only():
        return Tensor._wrap(-g._data)
    return Neg.apply(g)


class Mul(Function):
    """y = a * b;  ga = gy * b, gb = gy * a."""

    def forward(self, a, b):
        return a * b

    def backward(self, gy):
        a, b = self.inputs
        if a is b:  # y = a * a: both gradients are gy * a (the engine adds them), made once
            ga = _times(gy, a)
            return ga, ga
        ga = sum_to(_times(gy, b), a.shape) if self.needs_input_grad[0] else None
        gb = sum_to(_times(gy, a), b.shape) if self.needs_input_grad[1] else None
        return ga, gb


def _times(gy, x):
    """gy * x: Mul's array call directly where nothing records (see arrays_only) and the
    dtypes agree (no promotion to record), else a Mul node."""
    if arrays_only() and gy._data.dtype is x._data.dtype:
        return Tensor._wrap(gy._data * x._data)
    return gy * x


class Scale(Function):
    """y = c * x for a constant Python number c;  gx = c * gy.

    Mul with a number would wrap it in a tensor and save both inputs; the constant
    needs neither (means, learning rates and loss weights are all this op).
    """

    saves_inputs = False

    def __init__(self, c):
        self.c = c

    def forward(self, x):
        return x * self.c

    def backward(self, gy):
        return _scaled(gy, self.c)


def _scaled(gy, c):
    """c * gy: Scale's array call directly where nothing records (see arrays_only), else a
    Scale node."""
    if arrays_only():
        return Tensor._wrap(gy._data * c)
    return Scale.apply(gy, c=c)


class AddScaled(_BroadcastShapes):
    """y = a + c * b for a constant number c;  ga = gy, gb = c * gy.

    The SGD step p - lr * g as one node (c = -lr) instead of Scale then Sub: the
    inner loop of MAML runs it for every parameter at every step.
    """

    def __init__(self, c):
        self.c = c

    def forward(self, a, b):
        if a.shape != b.shape:  # (equal shapes are kept as None: see _BroadcastShapes)
            self.shapes = (a.shape, b.shape)
        return a + self.c * b

    def backward(self, gy):
        sa, sb = self.shapes or (gy.shape, gy.shape)
        ga = sum_to(gy, sa) if self.needs_input_grad[0] else None
        gb = sum_to(_scaled(gy, self.c), sb) if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    """y = a / b;  ga = gy / b, gb = -gy * a / b**2 = -gy * y / b."""

    saves_output = True  # backward reads self.output

    def forward(self, a, b):
        return a / b

    def backward(self, gy):
        a, b = self.inputs
        ga = sum_to(gy / b, a.shape) if self.needs_input_grad[0] else None
        gb = sum_to(-gy * self.output / b, b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    """y = -x;  gx = -gy."""

    saves_inputs = False

    def forward(self, x):
        return -x

    def backward(self, gy):
        return _negated(gy)


class PowConst(Function):
    """y = x ** c for a constant c;  gx = gy * c * x ** (c - 1)."""

    def __init__(self, c):
        self.c = c

    def forward(self, x):
        return x**self.c

    def backward(self, gy):
        (x,) = self.inputs
        c = self.c
        if c == 0:  # x**0 = 1 does not depend on x (and 0 * x**-1 would be nan at x = 0)
            return gy * 0.0
        if c == 2:
            return gy * (2.0 * x)
        return gy * (c * x ** (c - 1))


class Pow(Function):
    """y = a ** b;  ga = gy * b * a ** (b - 1), gb = gy * a ** b * log(a).

    At a == 0 the formulas meet 0 * log(0) and 0 * 0 ** -1. PyTorch's convention, kept here:
    gb = 0 where a == 0 and b >= 0 (a ** b is 0, or 1, for every such b), and ga = 0 where
    a == b == 0. Both masks are built with the "double where": the masked positions compute
    the formula at a safe a = 1 and the result is then replaced by 0, so no inf or nan enters
    the graph and every higher derivative is finite too (0 there). Unlike PyTorch, ga is not
    also zeroed where b == 0 and a != 0: the value is 0 anyway, and masking it would drop its
    derivative in b (d2y/da db = 1 / a at b = 0), making the Hessian asymmetric.
    """

    saves_output = True  # backward reads self.output

    def forward(self, a, b):
        return a**b

    def backward(self, gy):
        a, b = self.inputs
        ga = gb = None
        # The masks are applied everywhere, also where they are all False: a branch on the
        # values would be one that tm.capture cannot replay, and the graph of the gradient
        # (hence the order in which a higher-order backward adds up) must not depend on them.
        if self.needs_input_grad[0]:
            at_zero = (a.data == 0) & (b.data == 0)
            a_safe = where(at_zero, 1.0, a)
            ga = sum_to(where(at_zero, 0.0, gy * b * a_safe ** (b - 1)), a.shape)
        if self.needs_input_grad[1]:
            at_zero = (a.data == 0) & (b.data >= 0)
            # output is 0 ** b (0 or 1) where masked, and log(1) = 0 there: all finite
            gb = where(at_zero, 0.0, gy * self.output * log(where(at_zero, 1.0, a)))
            gb = sum_to(gb, b.shape)
        return ga, gb


def add(a, b):
    a, b = promote(a, b)
    return Add.apply(a, b)


def sub(a, b):
    a, b = promote(a, b)
    return Sub.apply(a, b)


def add_scaled(a, b, c):
    """a + c * b for a Python number c, as one op (an SGD step is add_scaled(p, g, -lr))."""
    if not _is_number(c):
        raise TypeError(f"add_scaled: c must be a Python int or float, got {type(c).__name__}")
    return AddScaled.apply(a, b, c=c)


def mul(a, b):
    if type(a) is Tensor and type(b) is Tensor and a._data.dtype == b._data.dtype:
        return Mul.apply(a, b)  # the common case, decided without calls
    a, b = promote(a, b)
    if _is_number(b) and _is_float_tensor(a):
        return Scale.apply(a, c=b)
    if _is_number(a) and _is_float_tensor(b):
        return Scale.apply(b, c=a)
    return Mul.apply(a, b)


def _is_number(c) -> bool:
    """A Python int or float (not bool, not a NumPy scalar): it keeps a float tensor's dtype."""
    return type(c) is float or type(c) is int


def _is_float_tensor(x) -> bool:
    return isinstance(x, Tensor) and x._data.dtype.kind in "fc"


def div(a, b):
    """a / b, true division: integer and bool operands give float32 (PyTorch's rule)."""
    a, b = promote(a, b, true_divide=True)
    return Div.apply(a, b)


def neg(x):
    return Neg.apply(x)


def power(a, b):
    """a ** b; a constant Python exponent uses the simpler rule of PowConst."""
    if isinstance(b, (np.integer, np.floating)):
        b = b.item()  # a NumPy scalar exponent acts as a Python one: it must not promote x
    a, b = promote(a, b)
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        return PowConst.apply(a, c=b)
    return Pow.apply(a, b)
