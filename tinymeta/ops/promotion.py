"""The dtype of a binary op's result (PyTorch's rule), applied to its arguments.

Its own module, below the ops that take two arguments (arithmetic, selection): each of them
promotes its arguments first.
"""

from __future__ import annotations

from tinymeta.backend import promoted_dtype
from tinymeta.tensor import Tensor


def promote(a, b, true_divide: bool = False) -> tuple:
    """``a`` and ``b`` with integer and bool tensors cast to the result dtype of PyTorch's rule
    (``backend.promoted_dtype``); Python numbers then take that dtype in ``as_tensor_like``.

    Only tensors of a lower category are cast: they cannot require grad, so the cast is a
    constant. Float tensors of different widths are left to NumPy (which widens, as PyTorch).
    """
    # The common cases first, decided without calls: this runs before every binary op.
    if type(a) is Tensor:
        if type(b) is Tensor:
            dtype = a._data.dtype
            # `is`: NumPy's built-in dtypes are singletons (a mismatch takes the full path)
            if dtype is b._data.dtype and (not true_divide or dtype.kind in "fc"):
                return a, b
        elif (type(b) is float or type(b) is int) and a._data.dtype.kind in "fc":
            return a, b
    elif (type(a) is float or type(a) is int) and type(b) is Tensor and b._data.dtype.kind in "fc":
        return a, b
    dtype = promoted_dtype((a, b), true_divide)
    return _cast_lower(a, dtype), _cast_lower(b, dtype)


def _cast_lower(x, dtype):
    if isinstance(x, Tensor) and dtype is not None and x.dtype.kind != dtype.kind:
        if x.dtype.kind in "biu":  # integers never carry a gradient: a constant cast
            return Tensor._wrap(x.data.astype(dtype))
    return x
