"""A batched matrix product as one CUDA kernel (kernels/cuda/matmul.cu), for small products.

``matmul(a, b)`` gives NumPy's ``a @ b`` for arrays of one float dtype (float32 or float64)
of at least two axes, batch axes broadcast. The kernel reads both operands through their
element strides, so a transposed operand (a swapaxes view) or a broadcast batch axis costs no
copy; only negative strides, strides that are not whole elements, and batch axes that do not
merge into two are copied first. The result is a new C-contiguous array.

Each element is a float sum over k in increasing order of products each rounded on its own:
what a naive loop gives, the same bits on every run (cuBLAS's order is its own). Which products
take it is ``tinymeta.kernels.cuda_matmul_choice``'s decision; arrays are CuPy arrays on a GPU,
NumPy arrays when tests/cuda_emulator.py runs the kernel on the CPU.
"""

from __future__ import annotations

import numpy as np

from . import reference
from .cuda_launch import CudaSource

_MATMUL = CudaSource("matmul.cu", ("matmul",))
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
KERNEL_BATCH_AXES = 2  # the batch axes the kernel walks with strides of their own


def matmul(a, b):
    """``a @ b`` by the kernel: a (..., m, k), b (..., k, n) of one float dtype, batch axes
    broadcast; returns a C-contiguous (batch..., m, n) array."""
    batch, m, k, n = _check_operands(a, b)
    xp = reference._array_module(a)
    if 0 in (m, n, k) or 0 in batch:  # no sum to run: NumPy gives zeros
        return xp.zeros(batch + (m, n), a.dtype)
    a, b = _readable(xp, a), _readable(xp, b)
    axes = _merged_batch_axes(batch, _batch_strides(a, batch), _batch_strides(b, batch))
    if axes is None:  # batch axes that do not merge into two: copy both in full
        a = xp.ascontiguousarray(xp.broadcast_to(a, batch + (m, k)))
        b = xp.ascontiguousarray(xp.broadcast_to(b, batch + (k, n)))
        axes = _merged_batch_axes(batch, _batch_strides(a, batch), _batch_strides(b, batch))
    sizes, a_batch, b_batch = axes
    c = xp.empty(batch + (m, n), a.dtype)
    args = (
        _span(xp, a), _span(xp, b), c, *_counts(*sizes, m, n, k),
        *_counts(*a_batch, *_element_strides(a)[-2:]),
        *_counts(*b_batch, *_element_strides(b)[-2:]),
    )  # fmt: skip
    _MATMUL.launch("matmul", a.dtype, c.size, args)
    return c


def _check_operands(a, b) -> tuple:
    """(batch shape, m, k, n) of a (..., m, k) @ b (..., k, n), or an error naming them."""
    if a.dtype not in _FLOATS or a.dtype != b.dtype:
        raise TypeError(
            f"matmul: the kernel takes float32 or float64 operands of one dtype, got {a.dtype} "
            f"and {b.dtype}"
        )
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"matmul: expected a (..., m, k) and b (..., k, n), got shapes {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    try:
        batch = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    except ValueError:
        raise ValueError(
            f"matmul: the batch axes of shapes {tuple(a.shape)} and {tuple(b.shape)} do not "
            "broadcast"
        ) from None
    return batch, a.shape[-2], a.shape[-1], b.shape[-1]


def _counts(*values) -> tuple:
    """Sizes and strides as the kernel's ``long long``."""
    return tuple(np.int64(v) for v in values)


def _element_strides(a) -> tuple:
    return tuple(s // a.itemsize for s in a.strides)


def _readable(xp, a):
    """``a`` itself when the kernel can read it through its strides (non-negative, whole
    elements), else a C-contiguous copy."""
    if all(s >= 0 and s % a.itemsize == 0 for s in a.strides):
        return a
    return xp.ascontiguousarray(a)


def _span(xp, a):
    """The memory the kernel reads through a's strides, from a's first element to its last,
    as a C-contiguous 1-D view (the kernel's pointer to a[0, ..., 0])."""
    extent = 1 + sum((size - 1) * s for size, s in zip(a.shape, _element_strides(a)))
    return xp.lib.stride_tricks.as_strided(a, shape=(extent,), strides=(a.itemsize,))


def _batch_strides(a, batch: tuple) -> tuple:
    """a's element strides along the broadcast batch axes ``batch``: 0 where a is broadcast."""
    own = a.shape[:-2]
    strides = _element_strides(a)[: len(own)]
    padded = (1,) * (len(batch) - len(own)) + tuple(own)
    padded_strides = (0,) * (len(batch) - len(own)) + strides
    return tuple(0 if size == 1 else s for size, s in zip(padded, padded_strides))


def _merged_batch_axes(batch: tuple, a_strides: tuple, b_strides: tuple):
    """The batch axes as KERNEL_BATCH_AXES axes: (sizes, a's strides, b's strides), merging
    neighbouring axes that both operands step through as one (a reshape of both would be a
    view); None when more remain."""
    axes = []  # [size, a stride, b stride], slowest first
    for size, sa, sb in zip(batch, a_strides, b_strides):
        if size == 1:
            continue
        if axes and axes[-1][1] == sa * size and axes[-1][2] == sb * size:
            axes[-1] = [axes[-1][0] * size, sa, sb]
        else:
            axes.append([size, sa, sb])
    if len(axes) > KERNEL_BATCH_AXES:
        return None
    axes = [[1, 0, 0]] * (KERNEL_BATCH_AXES - len(axes)) + axes
    sizes, a_batch, b_batch = zip(*axes)
    return sizes, a_batch, b_batch
