"""Making tensors: from data, filled, ranges and random."""

from __future__ import annotations

import functools
import weakref

import numpy as np

from tinymeta import backend
from tinymeta.tensor import DEFAULT_FLOAT, Tensor, counter_handed_out_with

_global_rng = np.random.default_rng()


def _default_dtype_for(data):
    """PyTorch's rule: floats -> float32, ints -> int64, bools -> bool; arrays keep theirs."""
    if hasattr(data, "dtype"):
        return None
    kind = np.asarray(data).dtype.kind
    if kind == "f":
        return DEFAULT_FLOAT
    if kind in "iu":
        return np.dtype(np.int64)
    return None


def _finish(array, device, requires_grad) -> Tensor:
    if device is not None:
        array = backend.move_array(array, device)
    return Tensor(array, requires_grad=requires_grad)


def tensor(data, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """A new tensor holding a copy of ``data`` (scalar, nested list, NumPy or CuPy array)."""
    if isinstance(data, Tensor):
        data = data.data
    if backend.cupy_or_none() is not None and not isinstance(data, np.ndarray):
        xp = backend.get_array_module(data)
    else:
        xp = np
    dtype = np.dtype(dtype) if dtype is not None else _default_dtype_for(data)
    if xp is np:
        array = np.array(data, dtype=dtype, copy=True)
    else:
        array = xp.array(data, dtype=dtype, copy=True)
    if array.dtype.kind not in "biufc":  # objects, strings, ...: not numbers
        raise TypeError(
            f"tensor: cannot make a tensor from {type(data).__name__} holding "
            f"non-numeric values (NumPy dtype {array.dtype})"
        )
    return _finish(array, device, requires_grad)


def from_numpy(array: np.ndarray) -> Tensor:
    """A tensor sharing memory with ``array`` (changes to one show in the other).

    Tensors made by ``from_numpy`` over one NumPy array, or over views of one array
    (``from_numpy(a)`` and ``from_numpy(a[1:])``), share one version counter: an in-place
    change through either is seen by graphs that saved the other. So does a tensor made
    over memory another tensor handed out (``from_numpy(u.data)``, ``u.data[1:]``) with
    that tensor, as ``t.data = u.data`` does. Memory shared in ways NumPy does not record
    in ``.base`` is not tracked.
    """
    if not isinstance(array, np.ndarray):
        raise TypeError(f"from_numpy: expected a numpy.ndarray, got {type(array).__name__}")
    t = Tensor(array)
    counter = counter_handed_out_with(array)
    if counter is None:
        counter = _numpy_counter(array)
    if counter is not None:
        t._vc = counter
    return t


# id(the object owning a NumPy array's memory) -> (weak reference to it, version counter)
_numpy_counters: dict = {}


def _numpy_counter(array: np.ndarray):
    """The version counter of the memory ``array`` is a view of (or owns)."""
    owner = array if array.base is None else array.base  # NumPy collapses chains of views
    key = id(owner)
    entry = _numpy_counters.get(key)
    if entry is not None and entry[0]() is owner:
        return entry[1]
    try:  # the entry goes with the owner (whose id may then be reused)
        ref = weakref.ref(owner, functools.partial(_forget, key))
    except TypeError:  # an owner without weak references (bytes, say): not tracked
        return None
    counter = [0, False]
    _numpy_counters[key] = (ref, counter)
    return counter


def _forget(key: int, ref) -> None:
    entry = _numpy_counters.get(key)
    if entry is not None and entry[0] is ref:  # not a newer owner that took the same id
        del _numpy_counters[key]


def _shape(shape) -> tuple:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(shape)


def _filled(fill, shape, dtype, device, requires_grad) -> Tensor:
    xp = backend.array_module_for(device or "cpu")
    dtype = np.dtype(dtype) if dtype is not None else DEFAULT_FLOAT
    return Tensor(xp.full(shape, fill, dtype=dtype), requires_grad=requires_grad)


def zeros(*shape, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return _filled(0, _shape(shape), dtype, device, requires_grad)


def ones(*shape, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return _filled(1, _shape(shape), dtype, device, requires_grad)


def full(shape, value, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if dtype is None and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        dtype = np.int64
    return _filled(value, shape, dtype, device, requires_grad)


def _like(t, fill, dtype, device, requires_grad):
    return _filled(fill, t.shape, dtype or t.dtype, device or t.device, requires_grad)


def zeros_like(t, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return _like(t, 0, dtype, device, requires_grad)


def ones_like(t, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return _like(t, 1, dtype, device, requires_grad)


def arange(start, stop=None, step=1, dtype=None, device=None, requires_grad: bool = False):
    """Like numpy.arange; integer arguments give int64, any float gives float32."""
    if stop is None:
        start, stop = 0, start
    if dtype is None:
        is_int = all(isinstance(v, (int, np.integer)) for v in (start, stop, step))
        dtype = np.int64 if is_int else DEFAULT_FLOAT
    array = np.arange(start, stop, step, dtype=dtype)
    return _finish(array, device, requires_grad)


def eye(n: int, m: int | None = None, dtype=None, device=None, requires_grad: bool = False):
    array = np.eye(n, m, dtype=dtype or DEFAULT_FLOAT)
    return _finish(array, device, requires_grad)


def manual_seed(seed: int) -> None:
    """Seed the generator that randn/rand (and layer initialisation) use without ``rng=``."""
    global _global_rng
    _global_rng = np.random.default_rng(seed)


def default_rng() -> np.random.Generator:
    return _global_rng


def randn(*shape, rng=None, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """Standard normal samples (drawn on the host, then moved: one stream for every device)."""
    rng = rng if rng is not None else _global_rng
    array = rng.standard_normal(_shape(shape)).astype(dtype or DEFAULT_FLOAT)
    return _finish(array, device, requires_grad)


def rand(*shape, rng=None, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """Uniform samples on [0, 1)."""
    rng = rng if rng is not None else _global_rng
    array = rng.random(_shape(shape)).astype(dtype or DEFAULT_FLOAT)
    return _finish(array, device, requires_grad)
