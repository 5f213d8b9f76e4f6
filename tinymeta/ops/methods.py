"""Tensor operators and methods, each delegating to an op wrapper (and ``backward``,
delegating to the engine).

Kept apart from tensor.py so that Tensor does not import the ops or the engine (which
import Tensor): this module runs once, when tinymeta is imported.
"""

from __future__ import annotations

from tinymeta import ops
from tinymeta.autograd import engine
from tinymeta.ops import inplace
from tinymeta.tensor import Tensor


def _reflected(op):
    return lambda self, other: op(other, self)


def _backward(self, gradient=None, retain_graph=None, create_graph=False) -> None:
    """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad."""
    engine.backward(self, gradient, retain_graph=retain_graph, create_graph=create_graph)


def _attach() -> None:
    T = Tensor
    T.backward = _backward
    T.__add__, T.__radd__ = ops.add, _reflected(ops.add)
    T.__sub__, T.__rsub__ = ops.sub, _reflected(ops.sub)
    T.__mul__, T.__rmul__ = ops.mul, _reflected(ops.mul)
    T.__truediv__, T.__rtruediv__ = ops.div, _reflected(ops.div)
    T.__pow__, T.__rpow__ = ops.power, _reflected(ops.power)
    T.__matmul__, T.__rmatmul__ = ops.matmul, _reflected(ops.matmul)
    # In place, as in PyTorch and NumPy: x += w writes into x's memory (aliases see it).
    for name in ("add_", "sub_", "mul_", "div_", "pow_", "copy_", "fill_", "zero_"):
        setattr(T, name, getattr(inplace, name))
    T.__iadd__, T.__isub__ = inplace.add_, inplace.sub_
    T.__imul__, T.__itruediv__, T.__ipow__ = inplace.mul_, inplace.div_, inplace.pow_
    T.__neg__ = ops.neg
    T.__pos__ = lambda self: self
    T.__getitem__ = ops.getitem
    T.__lt__, T.__le__ = ops.less, ops.less_equal
    T.__gt__, T.__ge__ = ops.greater, ops.greater_equal
    T.__eq__, T.__ne__ = ops.equal, ops.not_equal
    T.__hash__ = object.__hash__  # == is elementwise; identity still hashes

    for name in (
        "exp log sqrt abs sin cos tanh sigmoid relu sum mean var max min logsumexp "
        "transpose swapaxes broadcast_to squeeze expand_dims unsqueeze flatten clip "
        "astype sum_to"
    ).split():
        setattr(T, name, getattr(ops, name))
    T.reshape = ops.reshape
    T.to = ops.to_device
    T.T = property(lambda self: ops.transpose(self))
    T.__abs__ = ops.abs


_attach()
