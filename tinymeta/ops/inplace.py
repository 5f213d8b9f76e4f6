"""In-place arithmetic: ``add_``, ``sub_``, ``mul_``, ``div_``, ``pow_``, ``copy_``,
``fill_``, ``zero_`` and the augmented operators ``+=``, ``-=``, ``*=``, ``/=``, ``**=``,
as in PyTorch and NumPy.

The result is written into the tensor's memory, so every alias sees it (a view ``v = x[1:]``
changed by ``v += 1`` changes ``x``; ``p -= lr * p.grad`` updates the parameter the model
holds). When nothing has to be differentiated (grad mode off, or neither operand requires
grad) that is all, plus the version bump that graphs which saved the memory check.

When it has to be differentiated it is recorded as ``x[...] = x <op> other`` would be:
``x`` keeps its identity and gets a new creator, a SetItem node over the whole tensor, whose
input is the value ``<old x> <op> other`` computed by ordinary ops from a stand-in for ``x``
as it was. So ``x.add_(w)`` with ``w`` requiring grad gives ``w`` its gradient (it used to be
dropped without a word), and every order of derivative is that of the out-of-place op.
Refused, with the reason: a leaf that requires grad (no creator to record after; change it
under ``no_grad``), an integer tensor taking a differentiable value, and a tensor that shares
memory with a view (the view would not see the gradient), as for item assignment.
"""

from __future__ import annotations

import operator

import numpy as np

from tinymeta import backend, grad_mode
from tinymeta.ops.arithmetic import add, div, mul, power, sub
from tinymeta.ops.selection import astype
from tinymeta.ops.shape import Copy, _stand_in, check_recordable, record_assignment, setitem
from tinymeta.tensor import Tensor, _on_device_of


def add_(x: Tensor, other, alpha=1.0) -> Tensor:
    """x <- x + alpha * other, in place."""
    return _inplace(x, "add_", other, operator.iadd, add, saves_x=False, alpha=alpha)


def sub_(x: Tensor, other, alpha=1.0) -> Tensor:
    """x <- x - alpha * other, in place."""
    return _inplace(x, "sub_", other, operator.isub, sub, saves_x=False, alpha=alpha)


def mul_(x: Tensor, other) -> Tensor:
    """x <- x * other, in place."""
    return _inplace(x, "mul_", other, operator.imul, mul, saves_x=True)


def div_(x: Tensor, other) -> Tensor:
    """x <- x / other, in place (an integer tensor cannot hold the quotient: TypeError)."""
    return _inplace(x, "div_", other, operator.itruediv, div, saves_x=True)


def pow_(x: Tensor, exponent) -> Tensor:
    """x <- x ** exponent, in place."""
    return _inplace(x, "pow_", exponent, operator.ipow, power, saves_x=True)


def copy_(x: Tensor, src) -> Tensor:
    """x <- src (broadcast to x's shape, cast to x's dtype), in place. Unrecorded, src may be
    on another device (loading a checkpoint into a cuda model); recorded, it must not."""
    if not _records(x, src):
        _check_fits(x, "copy_", src)
        x._check_graph_memory("copy_")
        x._data[...] = _on_device_of(x._data, _array(src))
        return x._bump()
    return _inplace(x, "copy_", src, None, lambda old, value: value, saves_x=False)


def fill_(x: Tensor, value) -> Tensor:
    """x <- value everywhere, in place. Recorded (a SetItem over the whole tensor: x as it was
    gets no gradient) when x requires grad and grad mode is on."""
    return _fill(x, value, "fill_")


def zero_(x: Tensor) -> Tensor:
    """x <- 0, in place (see fill_)."""
    return _fill(x, 0, "zero_")  # its errors name zero_, the op the user called


def _fill(x: Tensor, value, op: str) -> Tensor:
    if isinstance(value, Tensor) and value.ndim != 0:
        raise ValueError(
            f"{op}: the value must be a number or a 0-d tensor, got shape {value.shape}"
        )
    if _records(x, value):
        check_recordable(x, op)
        setitem(x, Ellipsis, value, op)
        return x
    x._check_graph_memory(op)
    x._data[...] = _on_device_of(x._data, _array(value))
    return x._bump()


def _records(x: Tensor, other) -> bool:
    """Whether the change must be differentiated: grad mode on, and x or other requires grad."""
    if not grad_mode.is_grad_enabled():
        return False
    return x.requires_grad or (isinstance(other, Tensor) and other.requires_grad)


def _array(value):
    return value._data if isinstance(value, Tensor) else value  # the slot: no hand-out


def _scaled(other, alpha):
    """alpha * other (add_ and sub_'s ``alpha``)."""
    if alpha == 1.0:
        return other
    return mul(other, alpha) if isinstance(other, Tensor) else alpha * _array(other)


def _inplace(x: Tensor, op: str, other, array_op, tensor_op, saves_x: bool, alpha=1.0) -> Tensor:
    o = other if isinstance(other, Tensor) else None
    if o is not None and o.device != x.device:
        raise RuntimeError(
            f"{op}: the tensor is on {x.device} (shape {x.shape}) and the other operand on "
            f"{o.device} (shape {o.shape}); move one with .to(device)"
        )
    _check_fits(x, op, other)
    if not _records(x, other):
        x._check_graph_memory(op)
        _write(x, op, lambda a: array_op(a, _array(_scaled(other, alpha))))
        return x._bump()
    check_recordable(x, op)
    before = _stand_in(x)  # x as it was: it takes x's creator and hooks
    old = Copy.apply(before) if saves_x else before  # the node saving it keeps its own copy
    if o is x:
        o = old
    elif o is not None and backend.get_array_module(x._data).may_share_memory(x._data, o._data):
        o = Copy.apply(o)  # an alias of x: its values change with the write below
    # Scaled only now: alpha * x would be a node that used x itself, whose gradient cannot
    # be routed once x has its new creator (x.add_(x, alpha=2) was refused at backward).
    value = tensor_op(old, _scaled(o if o is not None else other, alpha))
    if value.dtype != x.dtype:
        value = astype(value, x.dtype)
    x._data[...] = value._data
    # x as it was reaches the result through value's graph: the node's own path to it is off
    record_assignment(x, before, Ellipsis, value, x_needs_grad=False, op=op)
    return x


def _check_fits(x: Tensor, op: str, other) -> None:
    """The result must have x's shape: other broadcasts into x, never x into other."""
    shape = np.shape(_array(other))
    try:
        fits = np.broadcast_shapes(shape, x.shape) == x.shape
    except ValueError:
        fits = False
    if not fits and op == "copy_":
        raise ValueError(f"copy_: cannot copy shape {shape} into {x.shape}")
    if not fits:
        raise ValueError(
            f"{op}: the other operand of shape {shape} does not broadcast to the tensor's "
            f"shape {x.shape}, which an in-place result must keep"
        )


def _write(x: Tensor, op: str, update) -> None:
    try:
        update(x._data)
    except TypeError as e:  # NumPy's casting rule: float into an int tensor, say
        raise TypeError(f"{op}: {e} (tensor of shape {x.shape}, dtype {x.dtype})") from e
