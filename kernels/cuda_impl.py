"""CUDA kernels behind ``tinymeta.kernels`` for CuPy arrays (the sources: kernels/cuda/*.cu).

Each function has the signature and results of its twin in ``reference.py``. It allocates
its outputs with the array module of its inputs (CuPy on a GPU; NumPy when the test suite
emulates the kernels on the CPU, tests/cuda_emulator.py), brings the inputs to the
C-contiguous layout the kernel reads, and launches it through ``cuda_launch.CudaSource``.

Layouts: elementwise kernels run on flat views in the arrays' memory order, so channels-last
activations need no copy; the pooling and window kernels read and write (N, H, W, C) arrays,
the channels-last memory of tinymeta's NCHW tensors, and return NCHW views of them, as
``numba_impl`` does. Inputs in other layouts are copied once.
"""

from __future__ import annotations

import numpy as np

from . import reference
from .cuda_launch import CudaSource

_ELEMENTWISE = CudaSource(
    "elementwise.cu", ("relu_forward", "relu_backward", "sgd_update", "adam_update")
)

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _count(n) -> np.int64:
    """A size or index as the kernels' ``long long``."""
    return np.int64(n)


# --- layouts ----------------------------------------------------------------------------------


def _memory_order(a) -> tuple:
    """a's axes from the slowest- to the fastest-varying in memory."""
    return tuple(sorted(range(a.ndim), key=lambda axis: -a.strides[axis]))


def _dense_order(a) -> tuple:
    """The axis order in which ``a`` is C-contiguous (its memory order), or C order when
    ``a`` is not dense (a slice, a broadcast)."""
    order = _memory_order(a)
    return order if a.transpose(order).flags.c_contiguous else tuple(range(a.ndim))


def _flat(a, order):
    """a's elements in the axis order ``order``, as a C-contiguous 1-D array (a view when a
    is dense in that order, else a copy)."""
    xp = reference._array_module(a)
    return xp.ascontiguousarray(a.transpose(order)).reshape(-1)


def _flat_in_place(a, order):
    """A 1-D view of ``a`` in the axis order ``order``, or None where a is not dense in it."""
    view = a.transpose(order)
    return view.reshape(-1) if view.flags.c_contiguous else None


def _empty_in_order(a, order):
    """An uninitialised array shaped like ``a``, laid out in memory in the axis order
    ``order``, and its flat view."""
    xp = reference._array_module(a)
    out = xp.empty([a.shape[axis] for axis in order], a.dtype)
    return out.transpose(tuple(np.argsort(order).tolist())), out.reshape(-1)


def _one_float_dtype(*arrays) -> bool:
    return arrays[0].dtype in _FLOATS and all(a.dtype == arrays[0].dtype for a in arrays)


# --- elementwise steps of a training loop -----------------------------------------------------
# Other dtypes (float16, integers) and mixed dtypes take the reference.


def relu_forward(x):
    """See ``reference.relu_forward``: y in x's dtype and memory layout."""
    if not _one_float_dtype(x):
        return reference.relu_forward(x)
    order = _dense_order(x)
    y, y_flat = _empty_in_order(x, order)
    _ELEMENTWISE.launch("relu_forward", x.dtype, x.size, (_flat(x, order), y_flat, _count(x.size)))
    return y


def relu_backward(gy, x):
    """See ``reference.relu_backward``: gx in gy's dtype and memory layout."""
    if not _one_float_dtype(gy, x):
        return reference.relu_backward(gy, x)
    order = _dense_order(gy)
    gx, gx_flat = _empty_in_order(gy, order)
    args = (_flat(gy, order), _flat(x, order), gx_flat, _count(gy.size))
    _ELEMENTWISE.launch("relu_backward", gy.dtype, gy.size, args)
    return gx
