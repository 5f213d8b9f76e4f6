"""2-D convolution on NCHW tensors: im2col forward, col2im backward, any order.

The forward copies every kh x kw window of the (zero-padded) input once into an
im2col matrix and does one GEMM: no Python loop over pixels. Its input gradient
is one GEMM giving every window's share of the gradient and col2im, the adjoint
of im2col, adding each share back onto the pixel it was read from. The window
copies are ``tinymeta.kernels.im2col`` / ``col2im`` (Numba loops on the CPU, the
array-module reference on a GPU). The three ops are adjoint to one another:

    y  = conv2d(x, w)               y[n,o,i,j] = sum_{c,p,q} x_pad[n,c,i*sh+p,j*sw+q] w[o,c,p,q]
    gx = Conv2dGradInput(gy, w)     transposed convolution (col2im)
    gw = Conv2dGradWeight(x, gy)    correlation of the input with the output gradient

Each is bilinear in its two inputs, so the backward rule of each one is built
from the other two, and derivatives of every order flow through convolutions.

Per-task weights (task-vectorized MAML): x (T, N, C, H, W) with w (T, O, C, kh, kw)
convolves task t's images with task t's weights. The three ops take that
leading task axis as they are: the task axis is folded into the batch axis for
the window copies (im2col, col2im), and the GEMMs become batched GEMMs, one
``matmul`` over the task axis (T products of the same shapes as one task's).

Winograd: a 3x3 stride-1 convolution with at least ``WINOGRAD_MIN_CHANNELS`` input and
output channels (on the CPU) takes Winograd's F(2x2, 3x3) instead of im2col in all three ops:
every 2x2 block of outputs comes from a 4x4 input tile through 16 matrix products per task
(tiles x C by C x O) instead of 36, with cheap tile transforms around them
(``kernels.winograd_*``; the weight transform is two small tensor contractions here). The
three ops stay exact adjoints of one another (the transforms are linear and each op uses the
adjoint ones), so every derivative is the convolution's, up to float rounding.
On the CPU each op runs its transforms and products a few images at a time, in the cache.

Memory layout: tensors are NCHW (the shape users see), but internally the
arrays are laid out channels-last (NHWC in memory, an NCHW view on top). Then
the im2col copy moves whole channel vectors instead of scattered single
floats, and col2im adds whole channel vectors; NumPy's elementwise ops
and reductions keep the layout of their inputs, so the whole network runs
channels-last without anyone noticing.
"""

from __future__ import annotations

import math

import numpy as np

from tinymeta import kernels
from tinymeta._checks import check_int
from tinymeta.backend import get_array_module
from tinymeta.function import Function
from tinymeta.ops.reductions import sum as _sum


def pair(value, name: str, op: str, low: int = 0) -> tuple:
    """``value`` as a pair of ints >= ``low`` (an int stands for both axes)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
        return tuple(check_int(name, v, op, low=low) for v in value)
    v = check_int(name, value, op, low=low)
    return (v, v)


def output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def nhwc(x):
    """The NHWC view of an NCHW array (no copy)."""
    return x.transpose(0, 2, 3, 1)


def to_nchw(y):
    """The (..., C, H, W) view of a (..., H, W, C) array: NCHW shape, channels-last memory."""
    lead = tuple(range(y.ndim - 3))
    return y.transpose(lead + (y.ndim - 1, y.ndim - 3, y.ndim - 2))


def fold_tasks(x):
    """(T, N, C, H, W) -> (T*N, C, H, W), and a 4-D array as it is.

    A view for the arrays the convolutions make: the task and batch axes are the
    outermost ones in memory (channels-last keeps only C innermost).
    """
    return x.reshape((-1,) + x.shape[-3:])


def weight_matrix(w):
    """w (..., O, C, kh, kw) as (..., kh*kw*C, O): rows ordered like the im2col windows."""
    lead = w.ndim - 4
    order = tuple(range(lead)) + (lead + 2, lead + 3, lead + 1, lead)
    return w.transpose(order).reshape(w.shape[:lead] + (-1, w.shape[lead]))


def im2col(x, kh: int, kw: int, stride: tuple, padding: tuple):
    """The (N*OH*OW, kh*kw*C) matrix whose rows are the windows of x (NCHW): one copy.

    ``kernels.im2col`` writes the zero padding as it copies (no padded copy of x first) and
    leaves the windows C-contiguous, so the reshape to a matrix is free.
    """
    cols = kernels.im2col(x, kh, kw, *stride, *padding)
    return cols.reshape(-1, kh * kw * x.shape[1])


def rows_nhwc(g):
    """An (N, O, OH, OW) gradient as an (N*OH*OW, O) matrix (a view when it is channels-last)."""
    n, o, oh, ow = g.shape
    return nhwc(g).reshape(n * oh * ow, o)


# Winograd pays where the products dominate: below 16 channels (the first layer of an image
# network) the tile transforms cost more than the products they save.
WINOGRAD_MIN_CHANNELS = 16
# ... and where the 2x2 tiles cover the output well: 16 products per tile against 9 per output
# pixel; odd sizes waste the last row or column of tiles (a 3x3 output needs 4 tiles).
WINOGRAD_MAX_WORK = 0.6


def winograd_applies(x, c: int, o: int, kernel: tuple, stride: tuple, out_hw: tuple) -> bool:
    """Whether the convolution of host array x with a (o, c) + kernel weight takes Winograd."""
    if kernel != (3, 3) or tuple(stride) != (1, 1) or min(c, o) < WINOGRAD_MIN_CHANNELS:
        return False
    if not isinstance(x, np.ndarray):  # CuPy arrays keep im2col (one GEMM per op)
        return False
    oh, ow = out_hw
    tiles = ((oh + 1) // 2) * ((ow + 1) // 2)
    return 16 * tiles <= WINOGRAD_MAX_WORK * 9 * oh * ow


def winograd_weight(w):
    """U[4u+v, ..., c, o] = sum_{p,q} G[u,p] G[v,q] w[..., o, c, p, q]: w (..., O, C, 3, 3) as
    (16, ..., C, O), the right-hand operands of the 16 tile products."""
    xp = get_array_module(w)
    g = xp.asarray(kernels.reference.WINOGRAD_G, dtype=w.dtype)
    u = xp.tensordot(g, xp.tensordot(g, w, axes=([1], [w.ndim - 1])), axes=([1], [w.ndim - 1]))
    u = u.reshape((16,) + u.shape[2:])  # (16, ..., O, C)
    return xp.ascontiguousarray(u.swapaxes(-1, -2))


def winograd_weight_adjoint(du):
    """The adjoint of ``winograd_weight``: du (16, ..., C, O) as gw (..., O, C, 3, 3)."""
    xp = get_array_module(du)
    gt = xp.asarray(kernels.reference.WINOGRAD_G, dtype=du.dtype).T  # (3, 4)
    d = du.reshape((4, 4) + du.shape[1:])
    gw = xp.tensordot(gt, xp.tensordot(gt, d, axes=([1], [1])), axes=([1], [1]))  # (p, q, ...)
    lead = tuple(range(2, gw.ndim - 2))
    return xp.ascontiguousarray(gw.transpose(lead + (gw.ndim - 1, gw.ndim - 2, 0, 1)))


# The products of a convolution (im2col's and Winograd's) run in blocks of rows on the CPU.
# Their operands are narrow (64 channels; 9 window elements in a first layer) and tall (every
# pixel or tile a row), and come from memory, not the cache. OpenBLAS (one core) ran W2's
# products much slower whole than in blocks whose narrow side fits BLOCK_BYTES: the Winograd
# products (rows x 64 @ 64 x 64) at 57 GFLOP/s whole and 75 in 175-row blocks, the first
# layer's (rows x 9 @ 9 x 64) at 34 and 53, its weight gradient (64 x rows @ rows x 9) at 15
# and 47 (benchmarks/PROFILE.md, W2). None: no blocking.
BLOCK_BYTES = 51200  # 200 rows of 64 float32 values
# Blocks of fewer rows were slower than none (W2's 49-row blocks of 245, 75 of 225; a prime).
MIN_BLOCK_ROWS = 100


def row_blocks(a, width: int) -> int:
    """How many equal blocks of rows the (..., rows, K) operand ``a`` of a product whose
    narrow side is ``width`` splits into (1: none; always 1 for device arrays)."""
    if BLOCK_BYTES is None or not isinstance(a, np.ndarray):  # a GPU runs them whole
        return 1
    rows = a.shape[-2]
    limit = max(BLOCK_BYTES // (a.itemsize * max(width, 1)), 1)
    if rows <= limit:
        return 1
    fewest = -(-rows // limit)  # the fewest blocks that fit; the most that are big enough:
    most = rows // max(MIN_BLOCK_ROWS, 1)
    return next((k for k in range(fewest, most + 1) if rows % k == 0), 1)


def blocked_matmul(a, b):
    """a @ b for a (..., rows, K) and b (..., K, N), in blocks of rows (see BLOCK_BYTES)."""
    k = row_blocks(a, min(a.shape[-1], b.shape[-1]))
    if k == 1:
        return a @ b
    blocks = a.reshape(a.shape[:-2] + (k, -1, a.shape[-1])) @ b[..., None, :, :]
    return blocks.reshape(a.shape[:-1] + (b.shape[-1],))


def blocked_gram(a, b):
    """a^T @ b for a (..., rows, K) and b (..., rows, N), summed over blocks of rows."""
    k = row_blocks(a, min(a.shape[-1], b.shape[-1]))
    if k == 1:
        return a.swapaxes(-1, -2) @ b
    a = a.reshape(a.shape[:-2] + (k, -1, a.shape[-1]))
    b = b.reshape(b.shape[:-2] + (k, -1, b.shape[-1]))
    return (a.swapaxes(-1, -2) @ b).sum(axis=-3)


# The three Winograd ops make their tiles a chunk of images at a time: the transform, the 16
# products and the transform back (or the weight gradient's sum) run while the chunk's tiles
# (4x the images' size) are still in the cache, instead of writing every tile to memory and
# reading it back. Chunks of about BLOCK_BYTES' rows, like the products' row blocks. Each op
# makes its own tiles: handing one array's tiles to two ops (made whole, kept in memory) was
# slower than transforming it twice in the cache.


def images_per_chunk(n: int, tiles_per_image: int, width: int, itemsize: int) -> int:
    """How many of n images the fused Winograd path transforms and multiplies at once."""
    if BLOCK_BYTES is None:
        return n
    rows = max(BLOCK_BYTES // (itemsize * max(width, 1)), 1)
    return min(max(rows // tiles_per_image, 1), n)


def by_task(a, tasks: tuple):
    """(..., N, C, H, W) as (T*, N*, C, H, W): one row per task of ``tasks`` (a weight's
    leading axes), every image of that task along the second axis (a view here)."""
    return a.reshape((math.prod(tasks), -1) + a.shape[-3:])


def winograd_conv(x, w, tasks: tuple, padding: tuple, out_hw: tuple):
    """Conv2d's Winograd path from x itself, chunk by chunk: (..., N*OH*OW, O) rows."""
    u = winograd_weight(w)  # (16, ..., C, O)
    u = u.reshape((16, -1) + u.shape[-2:])
    xs = by_task(x, tasks)
    n, (oh, ow), o = xs.shape[1], out_hw, u.shape[-1]
    _, _, th, tw = kernels.winograd_tiles(*x.shape[-2:], *padding)
    y = np.empty((xs.shape[0], n, oh, ow, o), np.result_type(x.dtype, u.dtype))
    step = images_per_chunk(n, th * tw, min(x.shape[-3], o), y.itemsize)
    for t in range(xs.shape[0]):
        for first in range(0, n, step):
            v = kernels.winograd_input(xs[t, first : first + step], *padding)
            m = v.reshape(16, -1, v.shape[-1]) @ u[:, t]
            chunk = kernels.winograd_output(m.reshape(v.shape[:-1] + (o,)), oh, ow)
            y[t, first : first + step] = nhwc(chunk)
    return y.reshape(tasks + (-1, o))


def winograd_conv_grad_input(gy, w, tasks: tuple, x_hw: tuple, padding: tuple):
    """Conv2dGradInput's Winograd path from gy itself, chunk by chunk: gx (..., N, C, h, w),
    channels-last."""
    ut = winograd_weight(w).swapaxes(-1, -2)  # (16, ..., O, C)
    ut = ut.reshape((16, -1) + ut.shape[-2:])
    gys = by_task(gy, tasks)
    n, (h, wd), c = gys.shape[1], x_hw, ut.shape[-1]
    _, _, th, tw = kernels.winograd_tiles(h, wd, *padding)
    gx = np.empty((gys.shape[0], n, h, wd, c), np.result_type(gy.dtype, ut.dtype))
    step = images_per_chunk(n, th * tw, min(gy.shape[-3], c), gx.itemsize)
    for t in range(gys.shape[0]):
        for first in range(0, n, step):
            mg = kernels.winograd_output_adjoint(gys[t, first : first + step], th, tw)
            vg = mg.reshape(16, -1, mg.shape[-1]) @ ut[:, t]
            chunk = kernels.winograd_input_adjoint(
                vg.reshape(mg.shape[:-1] + (c,)), h, wd, *padding
            )
            gx[t, first : first + step] = nhwc(chunk)
    return to_nchw(gx).reshape(tasks + (-1, c, h, wd))


def winograd_conv_grad_weight(x, gy, tasks: tuple, padding: tuple):
    """Conv2dGradWeight's Winograd path, chunk by chunk: the products of x's and gy's tiles
    summed over chunks, per position and task, then the adjoint of the weight transform:
    gw (..., O, C, 3, 3)."""
    xs, gys = by_task(x, tasks), by_task(gy, tasks)
    n, c, o = xs.shape[1], x.shape[-3], gy.shape[-3]
    _, _, th, tw = kernels.winograd_tiles(*x.shape[-2:], *padding)
    du = np.zeros((16, xs.shape[0], c, o), np.result_type(x.dtype, gy.dtype))
    step = images_per_chunk(n, th * tw, min(c, o), du.itemsize)
    for t in range(xs.shape[0]):
        for first in range(0, n, step):
            v = kernels.winograd_input(xs[t, first : first + step], *padding)
            mg = kernels.winograd_output_adjoint(gys[t, first : first + step], th, tw)
            du[:, t] += v.reshape(16, -1, c).swapaxes(-1, -2) @ mg.reshape(16, -1, o)
    return winograd_weight_adjoint(du.reshape((16,) + tasks + (c, o)))


class Conv2d(Function):
    """y[n,o,i,j] = sum_{c,p,q} x_pad[n,c,i*sh+p,j*sw+q] w[o,c,p,q] + b[o];
    gx = Conv2dGradInput(gy, w), gw = Conv2dGradWeight(x, gy), gb = sum_{n,i,j} gy.

    With a task axis: x (T, N, C, H, W), w (T, O, C, kh, kw), b (T, O), and the
    same formulas for every t (y[t] = conv(x[t], w[t]) + b[t]).
    """

    def __init__(self, stride: tuple, padding: tuple):
        self.stride, self.padding = stride, padding

    def forward(self, x, w, b=None):
        tasks = w.shape[:-4]  # () for one weight, (T,) for one weight per task
        o, _, kh, kw = w.shape[-4:]
        n = x.shape[-4]
        oh = output_size(x.shape[-2], kh, self.stride[0], self.padding[0])
        ow = output_size(x.shape[-1], kw, self.stride[1], self.padding[1])
        if winograd_applies(x, w.shape[-3], o, (kh, kw), self.stride, (oh, ow)):
            y = winograd_conv(x, w, tasks, self.padding, (oh, ow))
        else:
            cols = im2col(fold_tasks(x), kh, kw, self.stride, self.padding)
            # One GEMM per task, (N*OH*OW, kh*kw*C) @ (kh*kw*C, O), all in one matmul call.
            y = blocked_matmul(cols.reshape(tasks + (-1, cols.shape[-1])), weight_matrix(w))
        if b is not None:
            b = b[..., None, :]  # (..., 1, O): one row, added to every window of its task
            if b.dtype == y.dtype:
                y += b  # y is a fresh array: add in place
            else:
                y = y + b
        return to_nchw(y.reshape(tasks + (n, oh, ow, o)))  # channels-last memory

    def backward(self, gy):
        x, w = self.inputs[:2]
        need_x, need_w = self.needs_input_grad[:2]
        geometry = {"stride": self.stride, "padding": self.padding}
        gx = Conv2dGradInput.apply(gy, w, x_shape=x.shape, **geometry) if need_x else None
        gw = Conv2dGradWeight.apply(x, gy, w_shape=w.shape, **geometry) if need_w else None
        if len(self.inputs) == 2:
            return gx, gw
        gb = _sum(gy, axis=(-4, -2, -1)) if self.needs_input_grad[2] else None
        return gx, gw, gb


class Conv2dGradInput(Function):
    """gx_pad[n,c,i*sh+p,j*sw+q] += sum_o gy[n,o,i,j] w[o,c,p,q]  (col2im);
    ggy = conv2d(ggx, w), gw = Conv2dGradWeight(ggx, gy).  (Per task with a task axis.)"""

    def __init__(self, x_shape: tuple, stride: tuple, padding: tuple):
        self.x_shape, self.stride, self.padding = tuple(x_shape), stride, padding

    def forward(self, gy, w):
        tasks = w.shape[:-4]
        n, c, h, wd = self.x_shape[-4:]
        o, _, kh, kw = w.shape[-4:]
        oh, ow = gy.shape[-2:]
        if winograd_applies(gy, c, o, (kh, kw), self.stride, (oh, ow)):
            # The adjoint of Conv2d's Winograd path: tiles of gy, products with U^T, back to x.
            return winograd_conv_grad_input(gy, w, tasks, (h, wd), self.padding)
        rows = rows_nhwc(fold_tasks(gy)).reshape(tasks + (-1, o))  # (T, N*OH*OW, O)
        # Every window's share of the gradient, (N*OH*OW, O) @ (O, kh*kw*C) per task in one
        # GEMM, then col2im adds each window element back onto the pixel it was read from.
        cols = blocked_matmul(rows, weight_matrix(w).swapaxes(-1, -2))
        cols = cols.reshape((-1, oh, ow, kh, kw, c))  # tasks folded into the batch axis
        gx = kernels.col2im(cols, h, wd, *self.stride, *self.padding)
        return gx.reshape(tasks + (n, c, h, wd))  # a view: the task axis is outermost

    def backward(self, ggx):
        gy, w = self.inputs
        need_gy, need_w = self.needs_input_grad
        geometry = {"stride": self.stride, "padding": self.padding}
        ggy = Conv2d.apply(ggx, w, **geometry) if need_gy else None
        gw = Conv2dGradWeight.apply(ggx, gy, w_shape=w.shape, **geometry) if need_w else None
        return ggy, gw


class Conv2dGradWeight(Function):
    """gw[o,c,p,q] = sum_{n,i,j} gy[n,o,i,j] x_pad[n,c,i*sh+p,j*sw+q];
    gx = Conv2dGradInput(gy, ggw), ggy = conv2d(x, ggw).  (Per task with a task axis.)"""

    def __init__(self, w_shape: tuple, stride: tuple, padding: tuple):
        self.w_shape, self.stride, self.padding = tuple(w_shape), stride, padding

    def forward(self, x, gy):
        tasks = self.w_shape[:-4]
        o, c, kh, kw = self.w_shape[-4:]
        if winograd_applies(x, c, o, (kh, kw), self.stride, gy.shape[-2:]):
            # sum over tiles of (input tile transform)^T (adjoint output transform of gy),
            # per position and task, then the adjoint of the weight transform.
            return winograd_conv_grad_weight(x, gy, tasks, self.padding)
        cols = im2col(fold_tasks(x), kh, kw, self.stride, self.padding)
        cols = cols.reshape(tasks + (-1, cols.shape[-1]))  # (T, N*OH*OW, kh*kw*C)
        rows = rows_nhwc(fold_tasks(gy)).reshape(tasks + (-1, o))  # (T, N*OH*OW, O)
        # One GEMM per task: (O, N*OH*OW) @ (N*OH*OW, kh*kw*C), then back to (O, C, kh, kw).
        gw = blocked_gram(rows, cols)
        return to_nchw(gw.reshape(tasks + (o, kh, kw, c)))

    def backward(self, ggw):
        x, gy = self.inputs
        geometry = {"stride": self.stride, "padding": self.padding}
        need_x, need_gy = self.needs_input_grad
        gx = Conv2dGradInput.apply(gy, ggw, x_shape=x.shape, **geometry) if need_x else None
        ggy = Conv2d.apply(x, ggw, **geometry) if need_gy else None
        return gx, ggy
