"""Shape ops. Each has a differentiable partner that undoes it in backward:
reshape/reshape, transpose/inverse transpose, broadcast_to/sum_to,
getitem/scatter-add, concatenate/slices; and item assignment ``x[i] = v``
(setitem: its backward zeroes the slot for x and gathers it for v).

Reshape, transpose, broadcast_to and basic indexing return views where NumPy
does: those outputs share their input's version counter (function.ViewFunction)."""

from __future__ import annotations

import weakref

import numpy as np

from tinymeta import backend, function, grad_mode
from tinymeta.function import Function, ViewFunction
from tinymeta.tensor import RETAIN_GRAD, Tensor, _index_arrays, _on_device_of, share_version


def sum_to_array(xp, x, shape: tuple):
    """Sum the array ``x`` down to ``shape``: undoes NumPy broadcasting (``xp`` unused: the
    array's own methods serve NumPy and CuPy alike)."""
    if x.shape == shape:
        return x
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        [lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1]
    )
    # The array's own .sum (NumPy and CuPy alike) skips np.sum's Python wrapper.
    y = x.sum(axis=axes, keepdims=True) if axes else x
    return y.reshape(shape) if lead else y


class Reshape(ViewFunction):
    """y = reshape(x);  gx = reshape(gy, x.shape)."""

    saves_inputs = False

    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.in_shape = x.shape
        return x.reshape(self.shape)

    def backward(self, gy):
        return reshape(gy, self.in_shape)


def reshape(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    # Always a new tensor, even to x's own shape, as in PyTorch: the gradient with respect
    # to y = x.reshape(x.shape) counts the uses of y only, and a hook on y sees y's
    # gradient; were y x itself, both would be x's, every use of x included.
    return Reshape.apply(x, shape=shape)


class Transpose(ViewFunction):
    """y = transpose(x, axes);  gx = transpose(gy, argsort(axes))."""

    saves_inputs = False

    def __init__(self, axes):
        self.axes = axes

    def forward(self, x):
        if self.axes is None:
            self.axes = tuple(reversed(range(x.ndim)))
        y = x.transpose(self.axes)  # the method: no xp.transpose wrapper and dispatch
        # Non-negative axes, so that argsort in backward gives the inverse permutation.
        self.axes = tuple(a % x.ndim for a in self.axes)
        return y

    def backward(self, gy):
        inverse = sorted(range(len(self.axes)), key=self.axes.__getitem__)  # argsort(axes)
        if function.arrays_only_on_host(gy):  # the view alone: nothing would record it
            return Tensor._wrap(gy._data.transpose(inverse))
        return transpose(gy, *inverse)


def transpose(x, *axes):
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return Transpose.apply(x, axes=tuple(axes) if axes else None)


def swapaxes(x, axis1: int, axis2: int):
    axis1, axis2 = _check_axes("swapaxes", (axis1, axis2), x.ndim)
    axes = list(range(x.ndim))
    axes[axis1], axes[axis2] = axes[axis2], axes[axis1]
    return transpose(x, *axes)


class BroadcastTo(ViewFunction):
    """y = broadcast_to(x, shape);  gx = sum_to(gy, x.shape)."""

    saves_inputs = False

    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.in_shape = x.shape
        return self.xp.broadcast_to(x, self.shape)

    def backward(self, gy):
        return sum_to(gy, self.in_shape)


def broadcast_to(x, shape):
    shape = tuple(shape)
    return BroadcastTo.apply(x, shape=shape)  # a new tensor even to x's shape (see reshape)


class SumTo(Function):
    """y = sum_to(x, shape) (sum over broadcast axes);  gx = broadcast_to(gy, x.shape)."""

    saves_inputs = False

    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.in_shape = x.shape
        return sum_to_array(self.xp, x, self.shape)

    def backward(self, gy):
        return broadcast_to(gy, self.in_shape)


def sum_to(x, shape):
    """Sum ``x`` down to ``shape``, the reduction that undoes broadcasting."""
    shape = tuple(shape)
    if x.shape == shape:
        return x
    if function.arrays_only():  # SumTo.forward without the node (see arrays_only)
        return Tensor._wrap(sum_to_array(None, x._data, shape))
    return SumTo.apply(x, shape=shape)


def _check_axes(op: str, axes: tuple, ndim: int) -> tuple:
    """``axes`` made non-negative; an axis outside ``-ndim..ndim-1`` raises (as in NumPy)."""
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{op}: axis {a} is out of range for {ndim} dimensions")
    return tuple(a % ndim for a in axes)


def squeeze(x, axis=None):
    if axis is None:
        shape = tuple(n for n in x.shape if n != 1)
    else:
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        axes = set(_check_axes("squeeze", axes, x.ndim or 1))  # 0-d: axis 0 or -1, as NumPy
        axes = axes if x.ndim else set()
        for a in axes:
            if x.shape[a] != 1:
                raise ValueError(
                    f"squeeze: axis {a} of shape {x.shape} has size {x.shape[a]}, not 1"
                )
        shape = tuple(n for i, n in enumerate(x.shape) if i not in axes)
    return reshape(x, shape)


def expand_dims(x, axis):
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    ndim = x.ndim + len(axes)
    axes = sorted(_check_axes("expand_dims", axes, ndim))
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return reshape(x, tuple(shape))


unsqueeze = expand_dims


def flatten(x, start_axis: int = 0, end_axis: int = -1):
    """Merge axes ``start_axis..end_axis`` into one (all of them by default)."""
    if x.ndim == 0:
        return reshape(x, (1,))
    start, end = start_axis % x.ndim, end_axis % x.ndim
    merged = int(np.prod(x.shape[start : end + 1]))
    return reshape(x, x.shape[:start] + (merged,) + x.shape[end + 1 :])


# --- indexing --------------------------------------------------------------------


def _is_basic(index) -> bool:
    """Basic indexing (ints, slices, None, ...) never repeats an element."""
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, np.integer, slice)) or i is None or i is Ellipsis for i in items)


class GetItem(ViewFunction):
    """y = x[index];  gx = scatter_add(zeros(x.shape), index, gy)."""

    saves_inputs = False

    def __init__(self, index):
        self.index = index

    def forward(self, x):
        self.in_shape = x.shape
        return x[self.index]

    def backward(self, gy):
        return ScatterAdd.apply(gy, index=self.index, shape=self.in_shape)


class ScatterAdd(Function):
    """y = zeros(shape); y[index] += gy (repeated indices accumulate);  ggy = ggx[index]."""

    saves_inputs = False

    def __init__(self, index, shape):
        self.index, self.shape = index, shape

    def forward(self, gy):
        gx = self.xp.zeros(self.shape, dtype=gy.dtype)
        if _is_basic(self.index):
            gx[self.index] = gy  # no repeats: plain assignment is faster
        elif self.xp is np or hasattr(self.xp.add, "at"):
            self.xp.add.at(gx, self.index, gy)  # CuPy (v13+): atomicAdd, repeats accumulate
        else:  # older CuPy: the same operation under its former name
            import cupyx

            cupyx.scatter_add(gx, self.index, gy)
        return gx

    def backward(self, ggx):
        return getitem(ggx, self.index)


def getitem(x, index):
    index = _index_arrays(index)
    if isinstance(x, Tensor) and type(x._data) is not np.ndarray:
        index = _index_on_device(index)
    return GetItem.apply(x, index=index)


def _index_on_device(index):
    """Host index arrays copied to the GPU once: CuPy would copy them again at every use
    (the forward, and the scatter-add and gathers of every backward pass)."""

    def move(i):
        return backend.move_array(i, "cuda") if isinstance(i, np.ndarray) and i.ndim else i

    return tuple(move(i) for i in index) if isinstance(index, tuple) else move(index)


# --- item assignment ------------------------------------------------------------------


class SetItem(Function):
    """y = x with y[index] = v (v broadcast into the slot);  gx = gy with gy[index] = 0,
    gv = gy[index] summed to v's shape.

    Recorded by ``setitem`` only; the output is the tensor ``x`` itself (its memory
    written in place), the input is a stand-in for ``x`` as it was before."""

    saves_inputs = False

    changed_by = "__setitem__"  # the in-place op recorded (set by record_assignment)

    def __init__(self, index, value_shape):
        self.index, self.value_shape = index, value_shape

    def backward(self, gy):
        gx = ZeroAt.apply(gy, index=self.index) if self.needs_input_grad[0] else None
        gv = None
        if self.needs_input_grad[1]:
            slot = getitem(gy, self.index)
            # NumPy assigns v of shape (1, 3) into a slot of shape (3,): leading 1s drop.
            lead = max(len(self.value_shape) - slot.ndim, 0)
            gv = reshape(sum_to(slot, self.value_shape[lead:]), self.value_shape)
        return gx, gv


class ZeroAt(Function):
    """y = x with y[index] = 0;  gx = gy with gy[index] = 0 (the same projection)."""

    saves_inputs = False

    def __init__(self, index):
        self.index = index

    def forward(self, x):
        y = x.copy()
        y[self.index] = 0
        return y

    def backward(self, gy):
        return ZeroAt.apply(gy, index=self.index)


class Copy(Function):
    """y = a copy of x (memory of its own);  gx = gy."""

    saves_inputs = False

    def forward(self, x):
        return x.copy()

    def backward(self, gy):
        return gy


def setitem(x: Tensor, index, value, op: str = "__setitem__") -> None:
    """``x[index] = value``, written into ``x``'s memory (``op``: the method that asked for it,
    named by the errors; fill_ and zero_ come here).

    When it has to be differentiated (grad mode on, and ``value`` or ``x`` requires
    grad) it is recorded as in PyTorch: ``x`` keeps its identity and gets a new creator,
    a SetItem node whose input stands for ``x`` as it was. The version bump makes graphs
    that saved the old ``x`` (or any alias of its memory) refuse their backward.
    """
    index = _index_arrays(index)
    if type(x.data) is not np.ndarray:
        index = _index_on_device(index)
    v = value if isinstance(value, Tensor) else None
    value_requires_grad = v is not None and v.requires_grad
    if not (grad_mode.is_grad_enabled() and (x.requires_grad or value_requires_grad)):
        x._check_graph_memory("__setitem__")
        try:
            x.data[index] = _on_device_of(x.data, v.data if v is not None else value)
        except (ValueError, IndexError, TypeError) as e:
            raise type(e)(f"__setitem__: {e} (tensor of shape {x.shape}, {x.dtype})") from e
        x._bump()
        return
    check_recordable(x, op, index)
    if v is None:  # a constant: it takes part in the node without requiring grad
        v = Tensor._wrap(backend.get_array_module(x.data).asarray(_on_device_of(x.data, value)))
    if v.device != x.device:
        raise RuntimeError(
            f"__setitem__: the value is on {v.device} (shape {v.shape}) and the tensor on "
            f"{x.device} (shape {x.shape}); move one with .to(device)"
        )
    try:
        x.data[index] = v.data
    except (ValueError, IndexError, TypeError) as e:
        raise type(e)(
            f"__setitem__: {e} (tensor of shape {x.shape}, value of shape {v.shape})"
        ) from e
    before = _stand_in(x)
    if v is x:  # x[i] = x: the value is x as it was, not the output of the node recorded here
        v = before  # (it was: v's gradient went to that output and was lost without a word)
    record_assignment(x, before, index, v, before.requires_grad, op)


def record_assignment(
    x: Tensor, before: Tensor, index, v: Tensor, x_needs_grad: bool, op: str
) -> None:
    """Give x, whose memory now holds ``v`` at ``index``, a SetItem creator over ``before``
    (the stand-in for x as it was, from ``_stand_in``) and ``v``; ``op`` made the change."""
    x._bump()  # before shares the counter: graphs that saved x (as it was) see the change
    fn = SetItem(index, v.shape)
    fn.changed_by = op  # for errors about the change: the op the user called (add_, ...)
    fn._record((before, v), (x_needs_grad, v.requires_grad), (x,))
    function.inplace_recorded = True  # engine._collect now checks for stale uses of x
    if function._forward_hook is not None:
        function._forward_hook(fn, [x])


def check_recordable(x: Tensor, op: str, index=Ellipsis) -> None:
    """Refuse an in-place change of x (``x[index] = v``, ``x += w``, ...) that would have to be
    differentiated but cannot be; ``op`` names it in the message."""
    if x.is_leaf and x.requires_grad:
        raise RuntimeError(
            f"{op}: in-place change of a tensor that requires grad while grad mode is on (a "
            f"leaf of shape {x.shape}: no creator to record the change after). Change its "
            "values under `with tm.no_grad():` (as an optimizer does), or change a copy "
            "(y = x * 1.0)"
        )
    if x.dtype.kind not in "fc":
        raise TypeError(
            f"{op}: the value requires grad but the tensor (shape {x.shape}) has dtype "
            f"{x.dtype}; only a floating-point tensor can take a differentiable value"
        )
    if x._vc[1]:
        raise RuntimeError(
            f"{op}: the tensor (shape {x.shape}) shares memory with a view (made by indexing, "
            "reshape, transpose, ...; or it is one), which would not see the change's "
            "gradient. Change a tensor with memory of its own (y = x * 1.0), or build the "
            "result out of place (y = x + w; tm.where / tm.stack / tm.concatenate)"
        )
    if not _is_basic(index):
        xp = backend.get_array_module(x.data)
        positions = xp.arange(x.size).reshape(x.shape)[index]
        if xp.unique(positions).size != positions.size:
            raise RuntimeError(
                f"{op}: the index names some elements of the tensor (shape {x.shape}) more than "
                "once; which value lands there is not defined, nor is its gradient. Use unique "
                "indices"
            )


def _stand_in(x: Tensor) -> Tensor:
    """A new tensor that takes ``x``'s place in the graph as it was before an in-place op:
    its creator (whose output it becomes), hooks and memory (with its version counter)."""
    before = Tensor._wrap(x.data)
    share_version(x, before, view=False)  # one memory
    creator = x.grad_fn
    if creator is not None:
        before.grad_fn, before.requires_grad, before.generation = creator, True, x.generation
        creator.outputs = tuple(
            [weakref.ref(before) if ref() is x else ref for ref in creator.outputs]
        )
    hooks = x._hooks  # hooks see the gradient of x as it was; retain_grad() stays with x
    before._hooks, x._hooks = hooks, None
    if hooks and RETAIN_GRAD in hooks:
        hooks.remove(RETAIN_GRAD)
        x._hooks = [RETAIN_GRAD]
    return before


# --- joining ------------------------------------------------------------------------


class Concatenate(Function):
    """y = concatenate(xs, axis);  gx_i = gy[..., offset_i : offset_i + n_i, ...]."""

    saves_inputs = False

    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        y = self.xp.concatenate(xs, axis=self.axis)  # first: its error names the mismatch
        self.sizes = [x.shape[self.axis] for x in xs]
        return y

    def backward(self, gy):
        axis = self.axis % gy.ndim
        gxs, start = [], 0
        for n, need in zip(self.sizes, self.needs_input_grad):
            if need:
                index = (slice(None),) * axis + (slice(start, start + n),)
                gxs.append(getitem(gy, index))
            else:
                gxs.append(None)
            start += n
        return tuple(gxs)


def concatenate(tensors, axis: int = 0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concatenate: need at least one tensor")
    return Concatenate.apply(*tensors, axis=axis)


def stack(tensors, axis: int = 0):
    """Join tensors of one shape along a new axis."""
    tensors = [t if isinstance(t, Tensor) else Tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("stack: need at least one tensor")
    shapes = {t.shape for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"stack: all tensors must have one shape, got {sorted(shapes)}")
    return concatenate([expand_dims(t, axis) for t in tensors], axis=axis)
