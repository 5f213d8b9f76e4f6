"""Batch normalisation as CUDA kernels (``cuda/batchnorm.cu``): the CuPy backend's bn_* kernels.

Each function has the signature and results of its twin in ``reference.py`` and allocates its
outputs with the array module of its inputs: CuPy on a GPU; NumPy where the tests run the same
source on the CPU (tests/cuda_emulator.py). Statistics are per (task, channel) of x (T, N, C, S).

The kernels see every full-size array as a C-contiguous (T, outer, C, inner) array:
channels-last data (the layout tinymeta's convolutions leave, and any data with S == 1) as
(T, N * S, C, 1) without a copy, other data copied to (T, N, C, S). Per-(task, channel) sums
run in double in two launches without atomics (chunks, then their sum in a fixed order), so
results do not depend on scheduling.
"""

from __future__ import annotations

import numpy as np

from . import reference
from .cuda_launch import CudaSource

_SOURCE = CudaSource(
    "batchnorm.cu",
    (
        "bn_sum_partial",
        "bn_mean_finish",
        "bn_centred_square_partial",
        "bn_inv_std_finish",
        "bn_normalize",
        "bn_backward_partial",
        "bn_backward_finish",
        "bn_backward_input",
        "bn_double_backward_partial",
        "bn_double_backward_finish",
        "bn_double_backward_inputs",
    ),
)

# Chunks per (task, channel) in the first step of a sum: enough threads to fill a GPU when
# there are few channels, few enough that one thread per channel adds them quickly.
_CHUNKS = 256


class _Batch:
    """x (T, N, C, S) as the kernels see it, and the launches over it."""

    def __init__(self, x):
        t, n, c, s = x.shape
        self.xp = reference._array_module(x)
        self.dtype = x.dtype
        self.channels_last = bool(x.transpose(0, 1, 3, 2).flags.c_contiguous)
        self.full_shape = (t, n, s, c) if self.channels_last else (t, n, c, s)
        outer, inner = (n * s, 1) if self.channels_last else (n, s)
        self.dims = tuple(np.int64(d) for d in (t, outer, c, inner))
        self.stat_shape = (t, c)
        self.rows, self.count, self.size = t * c, n * s, x.size
        self.chunks = min(self.count, _CHUNKS)
        self.sizes = (np.int64(self.rows), np.int64(self.chunks))

    def full(self, a):
        """An array of x's shape, C-contiguous in the kernels' layout and x's dtype."""
        a = a.transpose(0, 1, 3, 2) if self.channels_last else a
        return self.xp.ascontiguousarray(a, dtype=self.dtype)

    def view(self, full):
        """The (T, N, C, S) view of an array in the kernels' layout: the inverse of ``full``."""
        return full.transpose(0, 1, 3, 2) if self.channels_last else full

    def empty_full(self):
        return self.xp.empty(self.full_shape, self.dtype)

    def per_row(self, p, default=None):
        """A (T, C) parameter, C-contiguous in x's dtype; None stands for ``default``."""
        if p is None:
            return self.xp.full(self.stat_shape, default, dtype=self.dtype)
        if tuple(p.shape) != self.stat_shape:  # (C,): the same for every task
            p = self.xp.broadcast_to(p, self.stat_shape)
        return self.xp.ascontiguousarray(p, dtype=self.dtype)

    def empty_stat(self):
        return self.xp.empty(self.stat_shape, self.dtype)

    def exact_stats(self, count: int):
        """Room for ``count`` values per (task, channel), in double."""
        return self.xp.empty((count, self.rows), np.float64)

    def scratch(self, sums: int):
        """Room for ``sums`` partial sums per (task, channel, chunk), in double."""
        return self.xp.empty((sums, self.rows, self.chunks), np.float64)

    def launch_partial(self, kernel: str, inputs: tuple, partial):
        """One thread per (task, channel, chunk): kernel(*inputs, *dims, chunks, partial)."""
        args = (*inputs, *self.dims, np.int64(self.chunks), partial)
        _SOURCE.launch(kernel, self.dtype, self.rows * self.chunks, args)

    def launch_rows(self, kernel: str, *args):
        """One thread per (task, channel)."""
        _SOURCE.launch(kernel, self.dtype, self.rows, args)

    def launch_elements(self, kernel: str, *args):
        """One thread per element of x."""
        _SOURCE.launch(kernel, self.dtype, self.size, args)


def _stats(batch: _Batch, x, eps: float):
    """mean and inv_std (T, C) of x (in the kernels' layout), and both in double (2, T * C)
    for the forward's normalisation: two passes over x."""
    partial, exact = batch.scratch(1), batch.exact_stats(2)
    mean, inv_std = batch.empty_stat(), batch.empty_stat()
    count = np.int64(batch.count)
    batch.launch_partial("bn_sum_partial", (x,), partial)
    batch.launch_rows("bn_mean_finish", partial, *batch.sizes, count, exact, mean)
    batch.launch_partial("bn_centred_square_partial", (x, exact), partial)
    batch.launch_rows(
        "bn_inv_std_finish", partial, *batch.sizes, count, np.float64(eps), exact, inv_std
    )
    return mean, inv_std, exact


def bn_stats(x, eps: float):
    """See ``reference.bn_stats``: mean and inv_std (T, C)."""
    batch = _Batch(x)
    return _stats(batch, batch.full(x), eps)[:2]


def bn_forward(x, weight, bias, eps: float):
    """See ``reference.bn_forward``: y (T, N, C, S), mean and inv_std (T, C)."""
    batch = _Batch(x)
    x = batch.full(x)
    mean, inv_std, exact = _stats(batch, x, eps)
    y = batch.empty_full()
    weight, bias = batch.per_row(weight), batch.per_row(bias)
    batch.launch_elements("bn_normalize", x, exact, weight, bias, *batch.dims, y)
    return batch.view(y), mean, inv_std


def bn_backward(gy, x, mean, inv_std, weight):
    """See ``reference.bn_backward``: gx (T, N, C, S), gw and gb (T, C)."""
    batch = _Batch(x)
    gy, x = batch.full(gy), batch.full(x)
    stats = (batch.per_row(mean), batch.per_row(inv_std))
    partial = batch.scratch(2)
    batch.launch_partial("bn_backward_partial", (gy, x, *stats), partial)
    sums = batch.exact_stats(2)  # gb, gw
    gw, gb = batch.empty_stat(), batch.empty_stat()
    batch.launch_rows("bn_backward_finish", partial, *batch.sizes, sums, gw, gb)
    gx = batch.empty_full()
    weight = batch.per_row(weight)
    batch.launch_elements("bn_backward_input", gy, x, *stats, weight, sums, *batch.dims, gx)
    return batch.view(gx), gw, gb


def bn_double_backward(gy, x, mean, inv_std, weight, ggx, ggw, ggb, need_gy=True, need_x=True):
    """See ``reference.bn_double_backward``: g_gy, g_x (T, N, C, S) or None, g_w (T, C).

    A None ggx, ggw or ggb is zero and a None weight is one, as in ``kernels.bn_double_backward``.
    """
    batch = _Batch(x)
    gy, x = batch.full(gy), batch.full(x)
    has_ggx = np.int64(ggx is not None)
    ggx = gy if ggx is None else batch.full(ggx)  # never read when missing
    stats = (batch.per_row(mean), batch.per_row(inv_std))
    partial = batch.scratch(5)
    batch.launch_partial("bn_double_backward_partial", (ggx, has_ggx, gy, x, *stats), partial)
    means = batch.exact_stats(5)  # mean(A), mean(B), m_A, m_B, c
    g_w = batch.empty_stat()
    count = np.int64(batch.count)
    batch.launch_rows(
        "bn_double_backward_finish", partial, *batch.sizes, count, stats[1], means, g_w
    )
    params = (batch.per_row(weight, 1.0), batch.per_row(ggw, 0.0), batch.per_row(ggb, 0.0))
    unused = batch.xp.empty(1, batch.dtype)  # stands in for an output that is not needed
    g_gy = batch.empty_full() if need_gy else unused
    g_x = batch.empty_full() if need_x else unused
    batch.launch_elements(
        "bn_double_backward_inputs",
        ggx, has_ggx, gy, x, *stats, *params, means, *batch.dims,
        np.int64(bool(need_gy)), np.int64(bool(need_x)), g_gy, g_x,
    )  # fmt: skip
    return (
        batch.view(g_gy) if need_gy else None,
        batch.view(g_x) if need_x else None,
        g_w,
    )
