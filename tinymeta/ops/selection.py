"""Ops that pick between values: where, maximum/minimum, clip. Their
gradients are masks (constants) times the incoming gradient."""

from __future__ import annotations

import numpy as np

from tinymeta import backend
from tinymeta.backend import get_array_module
from tinymeta.function import Function
from tinymeta.ops.promotion import promote
from tinymeta.ops.shape import sum_to
from tinymeta.tensor import Tensor, as_tensor_like, constant


def _array(v):
    return v.data if isinstance(v, Tensor) else v


class Where(Function):
    """y = where(cond, a, b);  ga = gy * cond, gb = gy * (1 - cond)."""

    saves_inputs = False

    def __init__(self, cond):
        self.cond = cond

    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        if self.xp is not np or type(self.cond) is not np.ndarray:
            # The condition is a constant, like an index: it follows the data's device.
            self.cond = backend.move_array(self.cond, backend.device_of(a))
        return self.xp.where(self.cond, a, b)

    def backward(self, gy):
        sa, sb = self.shapes
        ga = sum_to(gy * constant(self.cond), sa) if self.needs_input_grad[0] else None
        gb = sum_to(gy * constant(~self.cond), sb) if self.needs_input_grad[1] else None
        return ga, gb


def where(cond, a, b):
    """Elements of ``a`` where ``cond`` holds, else of ``b`` (broadcasting all three)."""
    cond = _array(cond)
    xp = get_array_module(cond)
    if not (isinstance(cond, xp.ndarray) and cond.dtype == bool):
        # Only then: asarray would turn the traced mask of a step that tm.capture records into
        # a plain array, which its replays would read as a constant.
        cond = xp.asarray(cond, dtype=bool)
    a, b = promote(a, b)  # PyTorch's dtype rule (int tensor with 2.5 gives float32)
    return Where.apply(a, b, cond=cond)


class Maximum(Function):
    """y = maximum(a, b);  ga = gy * [a > b], gb = gy * [a < b]; ties split the gradient evenly."""

    numpy_name = "maximum"
    pick_first = staticmethod(lambda a, b: a > b)

    def forward(self, a, b):
        return getattr(self.xp, self.numpy_name)(a, b)

    def backward(self, gy):
        a, b = self.inputs
        first = self.pick_first(a.data, b.data) + 0.5 * (a.data == b.data)
        ga = (
            sum_to(gy * constant(first.astype(gy.dtype)), a.shape)
            if self.needs_input_grad[0]
            else None
        )
        gb = (
            sum_to(gy * constant((1 - first).astype(gy.dtype)), b.shape)
            if self.needs_input_grad[1]
            else None
        )
        return ga, gb


class Minimum(Maximum):
    """y = minimum(a, b);  ga = gy * [a < b], gb = gy * [a > b]; ties split evenly."""

    numpy_name = "minimum"
    pick_first = staticmethod(lambda a, b: a < b)


def maximum(a, b):
    return Maximum.apply(*promote(a, b))


def minimum(a, b):
    return Minimum.apply(*promote(a, b))


class Clip(Function):
    """y = clip(x, lo, hi);  gx = gy * [lo <= x <= hi] (the bounds themselves pass the gradient)."""

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return self.xp.clip(x, self.lo, self.hi)

    def backward(self, gy):
        x = self.inputs[0].data
        # Out of place: an in-place &= on a fresh array is one that tm.capture cannot replay.
        if self.lo is None:
            inside = x <= self.hi
        elif self.hi is None:
            inside = x >= self.lo
        else:
            inside = (x >= self.lo) & (x <= self.hi)
        return gy * constant(inside)


def clip(x, lo=None, hi=None):
    if lo is None and hi is None:
        raise ValueError("clip: give at least one of lo and hi")
    return Clip.apply(x, lo=lo, hi=hi)


# --- comparisons: not differentiable, they return bool tensors --------------------------


def _on_gpu(v) -> bool:
    return backend.is_cupy_array(_array(v))


def _compare(name):
    def compare(a, b):
        if backend.cupy_or_none() is not None and (_on_gpu(a) or _on_gpu(b)):
            # As in arithmetic: a host array follows the tensors to the GPU, and tensors
            # on different devices raise.
            a, b = as_tensor_like([a, b], name)
        xp = get_array_module(_array(a) if isinstance(a, Tensor) else _array(b))
        return Tensor._wrap(getattr(xp, name)(_array(a), _array(b)))

    compare.__name__ = name
    return compare


less = _compare("less")
less_equal = _compare("less_equal")
greater = _compare("greater")
greater_equal = _compare("greater_equal")
equal = _compare("equal")
not_equal = _compare("not_equal")


# --- casts and moves ----------------------------------------------------------------------


class Cast(Function):
    """y = x as another dtype;  gx = gy cast back to x's dtype."""

    saves_inputs = False

    def __init__(self, dtype):
        self.dtype = dtype

    def forward(self, x):
        self.in_dtype = x.dtype
        return x.astype(self.dtype)

    def backward(self, gy):
        return astype(gy, self.in_dtype)


def astype(x, dtype):
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    if x.requires_grad and dtype.kind not in "fc":
        return Tensor._wrap(x.data.astype(dtype))  # an integer copy is cut from the graph
    return Cast.apply(x, dtype=dtype)


class ToDevice(Function):
    """y = x on another device;  gx = gy moved back."""

    saves_inputs = False

    def __init__(self, device):
        self.device = device

    def forward(self, x):
        from tinymeta.backend import device_of, move_array

        self.in_device = device_of(x)
        return move_array(x, self.device)

    def backward(self, gy):
        return to_device(gy, self.in_device)


def to_device(x, device):
    from tinymeta.backend import normalize_device

    device = normalize_device(device)
    if x.device == device:
        return x
    return ToDevice.apply(x, device=device)
