"""Reductions over ``axis`` (None, an int or a tuple), NumPy style."""

from __future__ import annotations

import builtins

from tinymeta.backend import get_array_module
from tinymeta.function import Function, arrays_only
from tinymeta.grad_mode import is_grad_enabled
from tinymeta.ops.shape import broadcast_to, reshape
from tinymeta.tensor import Tensor, constant


def normalize_axis(axis, ndim: int) -> tuple:
    """``axis`` as a sorted tuple of non-negative ints (None means all axes)."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    # As in NumPy, a 0-d tensor accepts axis 0 or -1: a reduction over no axes.
    n = builtins.max(ndim, 1)
    for a in axes:
        if not -n <= a < n:
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
    if ndim == 0:
        return ()
    return tuple(sorted({a % ndim for a in axes}))


def keepdims_shape(shape: tuple, axes: tuple) -> tuple:
    """The shape of a reduction over ``axes`` with keepdims=True."""
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def expand_reduced(gy, in_shape: tuple, axes: tuple, keepdims: bool):
    """Bring the gradient of a reduction back to the input's shape."""
    # Broadcasting lines shapes up from the right, so leading reduced axes (a sum over
    # everything, say) need no reshape back to keepdims form first.
    if not keepdims and axes != tuple(range(len(axes))):
        gy = reshape(gy, keepdims_shape(in_shape, axes))
    return broadcast_to(gy, in_shape)


class Sum(Function):
    """y = sum(x, axis);  gx = broadcast gy back over the summed axes."""

    saves_inputs = False

    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.in_shape = x.shape
        self.axes = normalize_axis(self.axis, x.ndim)
        # x.sum, not xp.sum: the method skips np.sum's Python wrapper (same on CuPy)
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        if not (gy.requires_grad and is_grad_enabled()):
            # Nothing will differentiate this gradient (a loss's seed, say): broadcast the
            # array directly, skipping the BroadcastTo node that would not be recorded anyway.
            g = gy._data
            if not self.keepdims:
                g = g.reshape(keepdims_shape(self.in_shape, self.axes))
            return constant(self.xp.broadcast_to(g, self.in_shape))
        return expand_reduced(gy, self.in_shape, self.axes, self.keepdims)


class Max(Function):
    """y = max(x, axis);  gx = gy routed to the arg-max.

    Ties split the gradient evenly among the tied elements (so the rule is
    symmetric, and the sum of the gradient equals gy, as for a unique max).
    """

    saves_output = True  # backward reads self.output

    reduce = "max"

    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.axes = normalize_axis(self.axis, x.ndim)
        return getattr(self.xp, self.reduce)(x, axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        (x,) = self.inputs
        xp = self.xp
        y = self.output._data
        if not self.keepdims:
            y = y.reshape(keepdims_shape(x.shape, self.axes))
        hit = x._data == y
        share = hit / xp.sum(hit, axis=self.axes, keepdims=True)
        return expand_reduced(gy, x.shape, self.axes, self.keepdims) * constant(
            share.astype(x.dtype)
        )


class Min(Max):
    """y = min(x, axis);  gx = gy routed to the arg-min (ties split evenly)."""

    reduce = "min"


class SquaredSum(Function):
    """y = c * sum(d * d) over every element, for a constant number c (1/n: a mean squared
    error, 1: a sum);  gd = 2 c gy d, formed as t + t with t = (c gy) d.

    One node in place of Mul, Sum and Scale, and one (SquaredSumGrad) in place of the three
    that their backward records under ``create_graph`` (MAML's inner gradient of an MSE
    loss). The array calls are those of the composition, so the values are the same bits.
    """

    def __init__(self, c):
        self.c = c

    def forward(self, d):
        y = (d * d).sum(axis=tuple(range(d.ndim)))  # (the axes Sum's forward passes)
        return y if self.c == 1 else y * self.c

    def backward(self, gy):
        (d,) = self.inputs
        if arrays_only():  # SquaredSumGrad's forward, without the node
            t = _scaled_array(gy._data, self.c) * d._data
            return Tensor._wrap(t + t)
        return SquaredSumGrad.apply(d, gy, c=self.c)


class SquaredSumGrad(Function):
    """gd = 2 c gy d (as t + t, t = (c gy) d), the gradient of SquaredSum;  its own:
    for d, (gg + gg) c gy; for gy, c sum((gg + gg) d)."""

    def __init__(self, c):
        self.c = c

    def forward(self, d, gy):
        t = _scaled_array(gy, self.c) * d
        return t + t

    def backward(self, gg):
        d, gy = self.inputs
        c = self.c
        if arrays_only():
            u = gg._data + gg._data
            gd = Tensor._wrap(u * _scaled_array(gy._data, c)) if self.needs_input_grad[0] else None
            ggy = None
            if self.needs_input_grad[1]:
                ggy = Tensor._wrap(_scaled_array((u * d._data).sum(), c))
            return gd, ggy
        u = gg + gg
        gd = u * (gy * c if c != 1 else gy) if self.needs_input_grad[0] else None
        ggy = None
        if self.needs_input_grad[1]:
            ggy = sum(u * d)
            ggy = ggy * c if c != 1 else ggy
        return gd, ggy


def _scaled_array(a, c):
    """c * a as Scale's forward computes it; a itself for c = 1 (x * 1 is x)."""
    return a if c == 1 else a * c


def squared_sum(d, c=1.0):
    """c * sum(d * d) over every element, as one op (see SquaredSum): mse_loss's reduction."""
    if type(c) is not float and type(c) is not int:
        raise TypeError(f"squared_sum: c must be a Python int or float, got {type(c).__name__}")
    if not isinstance(d, Tensor):
        raise TypeError(f"squared_sum: d must be a Tensor, got {type(d).__name__}")
    if d.dtype.kind not in "fc":
        raise TypeError(f"squared_sum: d must be a floating-point tensor, got dtype {d.dtype}")
    return SquaredSum.apply(d, c=c)


def mean_square(d):
    """mean(d * d) over every element, as one op: mse_loss's 'mean' (nan for an empty d)."""
    return squared_sum(d, _reciprocal(d.size) if isinstance(d, Tensor) else 1.0)


def sum(x, axis=None, keepdims: bool = False):  # noqa: A001 - mirrors numpy.sum
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def max(x, axis=None, keepdims: bool = False):  # noqa: A001
    return Max.apply(x, axis=axis, keepdims=keepdims)


def min(x, axis=None, keepdims: bool = False):  # noqa: A001
    return Min.apply(x, axis=axis, keepdims=keepdims)


def _count(x, axis) -> int:
    n = 1
    for a in normalize_axis(axis, x.ndim):
        n *= x.shape[a]
    return n


def _reciprocal(n: int) -> float:
    """1 / n, and inf for n <= 0: a mean over no values is 0 * inf = nan, as in NumPy and
    PyTorch (the gradient, shaped like the empty input, is empty), not a ZeroDivisionError."""
    return 1.0 / n if n > 0 else float("inf")


def mean(x, axis=None, keepdims: bool = False):
    """sum(x) / n;  nan where n = 0 (an empty axis)."""
    return sum(x, axis, keepdims) * _reciprocal(_count(x, axis))


def var(x, axis=None, keepdims: bool = False, ddof: int = 0):
    """mean((x - mean(x))**2), with n - ddof in the denominator (NumPy's default ddof=0).

    n - ddof <= 0 (one value with ddof=1, an empty axis) gives nan, as in NumPy and PyTorch.
    """
    centred = x - mean(x, axis, keepdims=True)
    return sum(centred * centred, axis, keepdims) * _reciprocal(_count(x, axis) - ddof)


def logsumexp(x, axis=None, keepdims: bool = False):
    """log(sum(exp(x))), stably: m + log(sum(exp(x - m))) with m = max(x) held constant.

    m cancels exactly in the derivative, so treating it as a constant keeps
    the result and every derivative exact while exp never overflows.
    """
    from tinymeta.ops.elementwise import exp, log

    axes = normalize_axis(axis, x.ndim)
    xp = get_array_module(x._data)
    if x.size == 0:  # max has no identity; an empty sum of exp is 0, so the result is -inf
        m = xp.zeros(keepdims_shape(x.shape, axes), dtype=x.dtype)
    else:
        m = x._data.max(axis=axes, keepdims=True)
        m = xp.where(xp.isfinite(m), m, 0)  # an all -inf slice must give -inf, not nan
    # m added back in the result's shape: the result is a sum of its own, not a view of one
    # (an in-place change of a view is refused)
    shift = m if keepdims else m.reshape([n for i, n in enumerate(x.shape) if i not in axes])
    return log(sum(exp(x - constant(m)), axes, keepdims=keepdims)) + constant(shift)
