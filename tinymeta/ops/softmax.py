"""Softmax and log-softmax along one axis, each one op with a differentiable backward.

    Softmax:     y = exp(x - max x) / sum exp(x - max x);  gx = y * (gy - sum(gy * y))
    LogSoftmax:  y = x - logsumexp(x);                      gx = gy - exp(y) * sum(gy)

Both backward rules read the op's output, itself a differentiable function of x, so every
higher order goes through them. ``tinymeta.nn.functional`` exports the wrappers as
``F.softmax`` and ``F.log_softmax``; the fused cross-entropy (``tinymeta.nn.softmax_xent``)
differentiates its gradient with ``softmax``.
"""

from __future__ import annotations

from tinymeta.function import Function
from tinymeta.ops.elementwise import exp
from tinymeta.ops.reductions import sum as _sum
from tinymeta.tensor import Tensor, as_input


def _axis(x: Tensor, axis: int, op: str) -> int:
    if not -x.ndim <= axis < max(x.ndim, 1) or x.ndim == 0:
        raise ValueError(f"{op}: axis {axis} is out of range for a tensor of shape {x.shape}")
    return axis % x.ndim


class Softmax(Function):
    """y = exp(x - max x) / sum exp(x - max x);  gx = y * (gy - sum(gy * y))."""

    saves_inputs = False
    saves_output = True

    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, x):
        if x.shape[self.axis] == 0:
            return x.copy()  # nothing to normalise (and max has no identity)
        # Shifting by the max changes nothing mathematically and keeps exp from overflowing.
        e = self.xp.exp(x - x.max(axis=self.axis, keepdims=True))
        e /= e.sum(axis=self.axis, keepdims=True)
        return e

    def backward(self, gy):
        y = self.output  # a differentiable function of x: higher orders go through it
        return y * (gy - _sum(gy * y, self.axis, keepdims=True))


def softmax(x, axis: int = -1) -> Tensor:
    """y = exp(x) / sum(exp(x)) along ``axis``, computed with the max-shift for stability."""
    x = as_input(x, "softmax")
    return Softmax.apply(x, axis=_axis(x, axis, "softmax"))


class LogSoftmax(Function):
    """y = x - logsumexp(x);  gx = gy - exp(y) * sum(gy)."""

    saves_inputs = False
    saves_output = True

    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, x):
        if x.shape[self.axis] == 0:
            return x.copy()  # nothing to normalise (and max has no identity)
        # logsumexp(x) = m + log sum exp(x - m) with m = max x: exp never overflows.
        shifted = x - x.max(axis=self.axis, keepdims=True)
        shifted -= self.xp.log(self.xp.exp(shifted).sum(axis=self.axis, keepdims=True))
        return shifted

    def backward(self, gy):
        # softmax = exp(y): reading it from the output keeps the rule differentiable.
        return gy - exp(self.output) * _sum(gy, self.axis, keepdims=True)


def log_softmax(x, axis: int = -1) -> Tensor:
    """y = x - logsumexp(x) along ``axis``, computed with the max-shift for stability."""
    x = as_input(x, "log_softmax")
    return LogSoftmax.apply(x, axis=_axis(x, axis, "log_softmax"))
