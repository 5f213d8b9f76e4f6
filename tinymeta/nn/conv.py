"""2-D convolution on NCHW tensors: im2col forward, col2im backward, any order.

The forward views every kh x kw window of the (padded) input without copying
(``as_strided``), copies the windows once into an im2col matrix and does one
GEMM: no Python loop over pixels. Its two gradients are ops of their own, and
the three are adjoint to one another:

    y  = conv2d(x, w)               y[n,o,i,j] = sum_{c,p,q} x_pad[n,c,i*sh+p,j*sw+q] w[o,c,p,q]
    gx = Conv2dGradInput(gy, w)     transposed convolution (col2im)
    gw = Conv2dGradWeight(x, gy)    correlation of the input with the output gradient

Each is bilinear in its two inputs, so the backward rule of each one is built
from the other two, and derivatives of every order flow through convolutions.

Memory layout: tensors are NCHW (the shape users see), but internally the
arrays are laid out channels-last (NHWC in memory, an NCHW view on top). Then
the im2col copy moves runs of kw * C contiguous floats instead of scattered
single ones, and col2im adds whole channel vectors; NumPy's elementwise ops
and reductions keep the layout of their inputs, so the whole network runs
channels-last without anyone noticing.
"""

from __future__ import annotations

import numpy as np

from tinymeta.function import Function
from tinymeta.ops.reductions import sum as _sum


def pair(value, name: str, op: str) -> tuple:
    """``value`` as a pair of non-negative ints (an int stands for both axes)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        out = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        out = tuple(int(v) for v in value)
    else:
        raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if min(out) < 0:
        raise ValueError(f"{op}: {name} must be non-negative, got {value!r}")
    return out


def output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def nhwc(x):
    """The NHWC view of an NCHW array (no copy)."""
    return x.transpose(0, 2, 3, 1)


def padded_nhwc(xp, x, ph: int, pw: int):
    """x (NCHW) as an NHWC array with ph zero rows above and below, pw zero columns each side."""
    if ph == 0 and pw == 0:
        return nhwc(x)
    n, c, h, w = x.shape
    out = xp.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=x.dtype)
    out[:, ph : ph + h, pw : pw + w, :] = nhwc(x)
    return out


def windows(xp, xh, kh: int, kw: int, sh: int, sw: int, oh: int, ow: int):
    """A read-only (N, OH, OW, kh, kw, C) view of the windows of the NHWC array xh: no copy."""
    n, c = xh.shape[0], xh.shape[3]
    s0, s1, s2, s3 = xh.strides
    shape = (n, oh, ow, kh, kw, c)
    strides = (s0, s1 * sh, s2 * sw, s1, s2, s3)
    if xp is np:
        return np.lib.stride_tricks.as_strided(xh, shape, strides, writeable=False)
    from cupy.lib.stride_tricks import as_strided  # CuPy's takes no writeable= argument

    return as_strided(xh, shape, strides)


def im2col(xp, x, kh: int, kw: int, stride: tuple, padding: tuple, oh: int, ow: int):
    """The (N*OH*OW, kh*kw*C) matrix whose rows are the windows of x (NCHW): one copy."""
    (sh, sw), (ph, pw) = stride, padding
    view = windows(xp, padded_nhwc(xp, x, ph, pw), kh, kw, sh, sw, oh, ow)
    return view.reshape(x.shape[0] * oh * ow, kh * kw * x.shape[1])


def rows_nhwc(g):
    """An (N, O, OH, OW) gradient as an (N*OH*OW, O) matrix (a view when it is channels-last)."""
    n, o, oh, ow = g.shape
    return nhwc(g).reshape(n * oh * ow, o)


class Conv2d(Function):
    """y[n,o,i,j] = sum_{c,p,q} x_pad[n,c,i*sh+p,j*sw+q] w[o,c,p,q] + b[o];
    gx = Conv2dGradInput(gy, w), gw = Conv2dGradWeight(x, gy), gb = sum_{n,i,j} gy."""

    def __init__(self, stride: tuple, padding: tuple):
        self.stride, self.padding = stride, padding

    def forward(self, x, w, b=None):
        xp = self.xp
        n, o = x.shape[0], w.shape[0]
        kh, kw = w.shape[2:]
        oh = output_size(x.shape[2], kh, self.stride[0], self.padding[0])
        ow = output_size(x.shape[3], kw, self.stride[1], self.padding[1])
        cols = im2col(xp, x, kh, kw, self.stride, self.padding, oh, ow)
        # One GEMM: (N*OH*OW, kh*kw*C) @ (kh*kw*C, O), the weight ordered like the windows.
        y = cols @ w.transpose(2, 3, 1, 0).reshape(-1, o)
        if b is not None:
            if b.dtype == y.dtype:
                y += b  # y is a fresh array: add in place
            else:
                y = y + b
        return y.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)  # NCHW view, channels-last memory

    def backward(self, gy):
        x, w = self.inputs[:2]
        geometry = {"stride": self.stride, "padding": self.padding}
        gx = (
            Conv2dGradInput.apply(gy, w, x_shape=x.shape, **geometry)
            if self.needs_input_grad[0]
            else None
        )
        gw = (
            Conv2dGradWeight.apply(x, gy, w_shape=w.shape, **geometry)
            if self.needs_input_grad[1]
            else None
        )
        if len(self.inputs) == 2:
            return gx, gw
        gb = _sum(gy, axis=(0, 2, 3)) if self.needs_input_grad[2] else None
        return gx, gw, gb


class Conv2dGradInput(Function):
    """gx_pad[n,c,i*sh+p,j*sw+q] += sum_o gy[n,o,i,j] w[o,c,p,q]  (col2im);
    ggy = conv2d(ggx, w), gw = Conv2dGradWeight(ggx, gy)."""

    def __init__(self, x_shape: tuple, stride: tuple, padding: tuple):
        self.x_shape, self.stride, self.padding = tuple(x_shape), stride, padding

    def forward(self, gy, w):
        xp = self.xp
        n, c, h, wd = self.x_shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        kh, kw = w.shape[2:]
        oh, ow = gy.shape[2:]
        rows = rows_nhwc(gy)  # (N*OH*OW, O)
        dtype = np.result_type(gy.dtype, w.dtype)
        gx = xp.zeros((n, h + 2 * ph, wd + 2 * pw, c), dtype=dtype)
        share = xp.empty((rows.shape[0], c), dtype=dtype)
        # col2im, one kernel offset (p, q) at a time: its share of every window, (N*OH*OW, O)
        # @ (O, C), lands on rows p, p+sh, ... and columns q, q+sw, ... of the padded input.
        # Per offset rather than one (N*OH*OW, kh*kw*C) product: the additions then read
        # contiguous blocks instead of every (kh*kw)-th channel vector (measured 1.5x faster).
        for p in range(kh):
            for q in range(kw):
                xp.matmul(rows, w[:, :, p, q], out=share)
                target = gx[:, p : p + sh * (oh - 1) + 1 : sh, q : q + sw * (ow - 1) + 1 : sw, :]
                target += share.reshape(n, oh, ow, c)
        return gx[:, ph : ph + h, pw : pw + wd, :].transpose(0, 3, 1, 2)

    def backward(self, ggx):
        gy, w = self.inputs
        ggy = (
            Conv2d.apply(ggx, w, stride=self.stride, padding=self.padding)
            if self.needs_input_grad[0]
            else None
        )
        gw = (
            Conv2dGradWeight.apply(
                ggx, gy, w_shape=w.shape, stride=self.stride, padding=self.padding
            )
            if self.needs_input_grad[1]
            else None
        )
        return ggy, gw


class Conv2dGradWeight(Function):
    """gw[o,c,p,q] = sum_{n,i,j} gy[n,o,i,j] x_pad[n,c,i*sh+p,j*sw+q];
    gx = Conv2dGradInput(gy, ggw), ggy = conv2d(x, ggw)."""

    def __init__(self, w_shape: tuple, stride: tuple, padding: tuple):
        self.w_shape, self.stride, self.padding = tuple(w_shape), stride, padding

    def forward(self, x, gy):
        o, c, kh, kw = self.w_shape
        oh, ow = gy.shape[2:]
        cols = im2col(self.xp, x, kh, kw, self.stride, self.padding, oh, ow)
        # One GEMM: (O, N*OH*OW) @ (N*OH*OW, kh*kw*C), then back to (O, C, kh, kw).
        gw = rows_nhwc(gy).T @ cols
        return gw.reshape(o, kh, kw, c).transpose(0, 3, 1, 2)

    def backward(self, ggw):
        x, gy = self.inputs
        geometry = {"stride": self.stride, "padding": self.padding}
        gx = (
            Conv2dGradInput.apply(gy, ggw, x_shape=x.shape, **geometry)
            if self.needs_input_grad[0]
            else None
        )
        ggy = Conv2d.apply(x, ggw, **geometry) if self.needs_input_grad[1] else None
        return gx, ggy
