"""Numba kernels: the loops behind ``tinymeta.kernels`` on the CPU.

Each public function here takes the same arrays as its twin in ``reference.py`` (any strides,
float32 or float64) and returns the same values. Inside, the loops run over C-contiguous
arrays with the channel axis innermost: tinymeta's NCHW arrays are channels-last in memory
(see tinymeta/nn/conv.py), so that view costs no copy for them, and the innermost loop walks
contiguous memory, which LLVM vectorizes. Other layouts are copied into it once.

Compiled once per dtype (``cache=True`` keeps the machine code on disk between runs); no
fastmath, so results follow IEEE arithmetic like the reference; no ``parallel=True``: the
single-thread loops run at memory speed, and the cores are left to BLAS and to the processes
of a distributed run. Sums are accumulated in float64 whatever the input dtype.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from . import reference

# --- layout helpers ---------------------------------------------------------------------------


def _rows(x):
    """(T, N, C, S) as a C-contiguous (T, N * S, C) array (a view of channels-last data)."""
    t, n, c, s = x.shape
    return np.ascontiguousarray(x.transpose(0, 1, 3, 2)).reshape(t, n * s, c)


def _unrows(rows, shape):
    """The (T, N, C, S) view of a (T, N * S, C) array: the inverse of ``_rows``, no copy."""
    t, n, c, s = shape
    return rows.reshape(t, n, s, c).transpose(0, 1, 3, 2)


def _channels_last(x):
    """(N, C, H, W) as a C-contiguous (N, H, W, C) array (a view of channels-last data)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


# --- batch normalisation ----------------------------------------------------------------------


@numba.njit(cache=True)
def _bn_stats_rows(x, eps, mean, inv_std):
    t_count, m_count, c_count = x.shape
    total = np.zeros(c_count)  # float64: float32 running sums of 10^4..10^5 terms drift
    for t in range(t_count):
        total[:] = 0.0
        for m in range(m_count):
            for c in range(c_count):
                total[c] += x[t, m, c]
        mu = total / m_count
        # Second pass over the centred values: no cancellation, unlike E[x^2] - E[x]^2.
        total[:] = 0.0
        for m in range(m_count):
            for c in range(c_count):
                d = x[t, m, c] - mu[c]
                total[c] += d * d
        for c in range(c_count):
            mean[t, c] = mu[c]
            inv_std[t, c] = 1.0 / np.sqrt(total[c] / m_count + eps)


@numba.njit(cache=True)
def _bn_forward_rows(x, weight, bias, eps, y, mean, inv_std):
    _bn_stats_rows(x, eps, mean, inv_std)
    for t in range(x.shape[0]):
        scale = inv_std[t] * weight[t]  # in x's dtype, so the full-size pass stays in it
        for m in range(x.shape[1]):
            for c in range(x.shape[2]):
                y[t, m, c] = (x[t, m, c] - mean[t, c]) * scale[c] + bias[t, c]


def bn_stats(x, eps: float):
    """See ``reference.bn_stats``: mean and inv_std (T, C)."""
    rows = _rows(x)
    t, _, c = rows.shape
    mean, inv_std = np.empty((t, c), x.dtype), np.empty((t, c), x.dtype)
    _bn_stats_rows(rows, float(eps), mean, inv_std)
    return mean, inv_std


def bn_forward(x, weight, bias, eps: float):
    """See ``reference.bn_forward``: y (T, N, C, S), mean and inv_std (T, C)."""
    rows = _rows(x)
    t, _, c = rows.shape
    y = np.empty_like(rows)
    mean, inv_std = np.empty((t, c), x.dtype), np.empty((t, c), x.dtype)
    _bn_forward_rows(
        rows,
        np.ascontiguousarray(weight, dtype=x.dtype),
        np.ascontiguousarray(bias, dtype=x.dtype),
        float(eps),
        y,
        mean,
        inv_std,
    )
    return _unrows(y, x.shape), mean, inv_std


@numba.njit(cache=True)
def _bn_backward_rows(gy, x, mean, inv_std, weight, gx, gw, gb):
    t_count, m_count, c_count = x.shape
    sum_gy = np.zeros(c_count)
    sum_gy_xhat = np.zeros(c_count)
    for t in range(t_count):
        sum_gy[:] = 0.0
        sum_gy_xhat[:] = 0.0
        for m in range(m_count):
            for c in range(c_count):
                g = gy[t, m, c]
                sum_gy[c] += g
                sum_gy_xhat[c] += g * ((x[t, m, c] - mean[t, c]) * inv_std[t, c])
        # gx = w s / n (n gy - gb - xhat gw) with xhat = (x - mean) s, as one multiply-add per
        # term: gx = a gy + b (x - mean) + d, with per-channel a, b, d.
        a = np.empty_like(mean[t])
        b = np.empty_like(mean[t])
        d = np.empty_like(mean[t])
        for c in range(c_count):
            gb[t, c] = sum_gy[c]
            gw[t, c] = sum_gy_xhat[c]
            ws = np.float64(weight[t, c]) * inv_std[t, c]
            a[c] = ws
            b[c] = -ws * inv_std[t, c] * sum_gy_xhat[c] / m_count
            d[c] = -ws * sum_gy[c] / m_count
        for m in range(m_count):
            for c in range(c_count):
                gx[t, m, c] = a[c] * gy[t, m, c] + b[c] * (x[t, m, c] - mean[t, c]) + d[c]


def bn_backward(gy, x, mean, inv_std, weight):
    """See ``reference.bn_backward``: gx (T, N, C, S), gw and gb (T, C)."""
    rows = _rows(x)
    t, _, c = rows.shape
    gx = np.empty_like(rows)
    gw, gb = np.empty((t, c), x.dtype), np.empty((t, c), x.dtype)
    _bn_backward_rows(
        _rows(gy.astype(x.dtype, copy=False)),
        rows,
        np.ascontiguousarray(mean, dtype=x.dtype),
        np.ascontiguousarray(inv_std, dtype=x.dtype),
        np.ascontiguousarray(weight, dtype=x.dtype),
        gx,
        gw,
        gb,
    )
    return _unrows(gx, x.shape), gw, gb


@numba.njit(cache=True)
def _bn_double_backward_rows(
    ggx, has_ggx, gy, x, mean, inv_std, weight, ggw, ggb, g_gy, g_x, g_w, need_gy, need_x
):
    t_count, m_count, c_count = x.shape
    # A missing ggx is zero: the loops read gy in its place and give it zero weight, so they
    # have no branch on it (the inner loops stay vectorizable; the need_* tests are hoisted).
    a_weight = 1.0 if has_ggx else 0.0
    sum_a, sum_b = np.zeros(c_count), np.zeros(c_count)
    sum_ad, sum_bd, sum_ab = np.zeros(c_count), np.zeros(c_count), np.zeros(c_count)
    for t in range(t_count):
        # Pass 1: the five per-channel sums the rule needs (d = x - mean, so xhat = s d).
        sum_a[:] = 0.0
        sum_b[:] = 0.0
        sum_ad[:] = 0.0
        sum_bd[:] = 0.0
        sum_ab[:] = 0.0
        for m in range(m_count):
            for c in range(c_count):
                a, b = ggx[t, m, c], gy[t, m, c]
                d = x[t, m, c] - mean[t, c]
                sum_a[c] += a
                sum_b[c] += b
                sum_ad[c] += a * d
                sum_bd[c] += b * d
                sum_ab[c] += a * b
        # The rule (see reference.bn_double_backward) as per-channel coefficients of
        # g_gy = ws A + e_d d + e_0  and  g_x = k_a A + k_b B + k_d d + k_0 (A = ggx, B = gy),
        # in x's dtype so that the full-size pass stays in it.
        ws, e_d, e_0 = np.empty_like(mean[t]), np.empty_like(mean[t]), np.empty_like(mean[t])
        k_a, k_b = np.empty_like(mean[t]), np.empty_like(mean[t])
        k_d, k_0 = np.empty_like(mean[t]), np.empty_like(mean[t])
        for c in range(c_count):
            s, w = np.float64(inv_std[t, c]), np.float64(weight[t, c]) * a_weight
            gw_c = np.float64(ggw[t, c])
            mean_a, mean_b = a_weight * sum_a[c] / m_count, sum_b[c] / m_count
            m_a, m_b = a_weight * s * sum_ad[c] / m_count, s * sum_bd[c] / m_count
            cov = a_weight * sum_ab[c] / m_count - mean_a * mean_b - m_a * m_b  # mean(A P(B))
            alpha = -w * s * s
            ws[c] = w * s
            e_d[c] = s * (gw_c - w * s * m_a)
            e_0[c] = ggb[t, c] - w * s * mean_a
            k_a[c] = alpha * m_b
            k_b[c] = alpha * m_a + s * gw_c
            k_d[c] = s * (alpha * (cov - 2.0 * m_a * m_b) - s * gw_c * m_b)
            k_0[c] = -alpha * (m_b * mean_a + m_a * mean_b) - s * gw_c * mean_b
            g_w[t, c] = s * m_count * cov
        # Pass 2: the full-size outputs, one multiply-add chain per element.
        for m in range(m_count):
            for c in range(c_count):
                a = ggx[t, m, c]
                d = x[t, m, c] - mean[t, c]
                if need_gy:
                    g_gy[t, m, c] = ws[c] * a + e_d[c] * d + e_0[c]
                if need_x:
                    g_x[t, m, c] = k_a[c] * a + k_b[c] * gy[t, m, c] + k_d[c] * d + k_0[c]


def bn_double_backward(gy, x, mean, inv_std, weight, ggx, ggw, ggb, need_gy=True, need_x=True):
    """See ``reference.bn_double_backward``: g_gy, g_x (T, N, C, S) or None, g_w (T, C)."""
    rows = _rows(x)
    t, m, c = rows.shape
    dtype = x.dtype
    none = np.empty((0, 0, 0), dtype)  # stands in for an output that is not needed
    g_gy = np.empty_like(rows) if need_gy else none
    g_x = np.empty_like(rows) if need_x else none
    g_w = np.empty((t, c), dtype)
    gy_rows = _rows(gy.astype(dtype, copy=False))
    _bn_double_backward_rows(
        gy_rows if ggx is None else _rows(ggx.astype(dtype, copy=False)),
        ggx is not None,
        gy_rows,
        rows,
        np.ascontiguousarray(mean, dtype=dtype),
        np.ascontiguousarray(inv_std, dtype=dtype),
        np.ascontiguousarray(weight, dtype=dtype),
        np.ascontiguousarray(ggw, dtype=dtype),
        np.ascontiguousarray(ggb, dtype=dtype),
        g_gy,
        g_x,
        g_w,
        need_gy,
        need_x,
    )
    return (
        _unrows(g_gy, x.shape) if need_gy else None,
        _unrows(g_x, x.shape) if need_x else None,
        g_w,
    )


# --- max-pooling with the arg-max of every window ---------------------------------------------
#
# Each kernel has a loop for any window and one for the common 2x2 window with stride 2, whose
# four offsets are spelled out: with no loop over offsets inside the loop over channels, LLVM
# vectorizes the channel loop (4-8x faster on the same data).


def _is_2x2(kh: int, kw: int, sh: int, sw: int) -> bool:
    return kh == kw == sh == sw == 2


@numba.njit(cache=True)
def _maxpool_argmax_any(x, kh, kw, sh, sw, y, argmax):
    n_count, oh, ow, c_count = y.shape
    for n in range(n_count):
        for i in range(oh):
            for j in range(ow):
                for c in range(c_count):
                    best = x[n, i * sh, j * sw, c]
                    arg = 0
                    for p in range(kh):
                        for q in range(kw):
                            v = x[n, i * sh + p, j * sw + q, c]
                            if v > best:  # strictly: a tie keeps the earlier offset
                                best = v
                                arg = p * kw + q
                    y[n, i, j, c] = best
                    argmax[n, i, j, c] = arg


@numba.njit(cache=True)
def _maxpool_argmax_2x2(x, y, argmax):
    n_count, oh, ow, c_count = y.shape
    for n in range(n_count):
        for i in range(oh):
            for j in range(ow):
                for c in range(c_count):
                    best, arg = x[n, 2 * i, 2 * j, c], 0
                    v = x[n, 2 * i, 2 * j + 1, c]
                    if v > best:  # strictly: a tie keeps the earlier offset
                        best, arg = v, 1
                    v = x[n, 2 * i + 1, 2 * j, c]
                    if v > best:
                        best, arg = v, 2
                    v = x[n, 2 * i + 1, 2 * j + 1, c]
                    if v > best:
                        best, arg = v, 3
                    y[n, i, j, c] = best
                    argmax[n, i, j, c] = arg


def maxpool2d_argmax(x, kh: int, kw: int, sh: int, sw: int):
    """See ``reference.maxpool2d_argmax``: y and argmax (N, C, OH, OW), channels-last."""
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    y = np.empty((n, oh, ow, c), x.dtype)
    argmax = np.empty((n, oh, ow, c), np.int8 if kh * kw < 128 else np.int32)
    if _is_2x2(kh, kw, sh, sw):
        _maxpool_argmax_2x2(_channels_last(x), y, argmax)
    else:
        _maxpool_argmax_any(_channels_last(x), kh, kw, sh, sw, y, argmax)
    return y.transpose(0, 3, 1, 2), argmax.transpose(0, 3, 1, 2)


@numba.njit(cache=True)
def _maxpool_scatter_any(gy, argmax, kw, sh, sw, gx):
    n_count, oh, ow, c_count = gy.shape
    gx[:] = 0.0
    for n in range(n_count):
        for i in range(oh):
            for j in range(ow):
                for c in range(c_count):
                    p = argmax[n, i, j, c] // kw
                    q = argmax[n, i, j, c] - p * kw
                    gx[n, i * sh + p, j * sw + q, c] += gy[n, i, j, c]  # windows may overlap


@numba.njit(cache=True)
def _maxpool_scatter_2x2(gy, argmax, gx):
    n_count, oh, ow, c_count = gy.shape
    zero = gx.dtype.type(0.0)
    # Written as a gather over gx's pixels: each pixel (r, s) of window (r // 2, s // 2) is
    # that window's offset k and takes gy where the arg-max is k, else zero. One store stream
    # (4 scattered ones keep LLVM from vectorizing: 4x slower). Every pixel in a window is
    # written once; a last odd row or column, in no window, is zeroed by the caller.
    for n in range(n_count):
        for r in range(2 * oh):
            for s in range(2 * ow):
                k = (r % 2) * 2 + s % 2
                i, j = r // 2, s // 2
                for c in range(c_count):
                    gx[n, r, s, c] = gy[n, i, j, c] if argmax[n, i, j, c] == k else zero


def maxpool2d_scatter(gy, argmax, kh: int, kw: int, sh: int, sw: int, h: int, w: int):
    """See ``reference.maxpool2d_scatter``: gx (N, C, h, w), channels-last."""
    n, c, oh, ow = gy.shape
    gy, argmax = _channels_last(gy), _channels_last(argmax)
    if _is_2x2(kh, kw, sh, sw):
        gx = np.empty((n, h, w, c), gy.dtype)
        _maxpool_scatter_2x2(gy, argmax, gx)
        gx[:, 2 * oh :] = 0.0
        gx[:, :, 2 * ow :] = 0.0
    else:
        gx = np.empty((n, h, w, c), gy.dtype)
        _maxpool_scatter_any(gy, argmax, kw, sh, sw, gx)
    return gx.transpose(0, 3, 1, 2)


@numba.njit(cache=True)
def _maxpool_gather_any(x, argmax, kw, sh, sw, y):
    n_count, oh, ow, c_count = y.shape
    for n in range(n_count):
        for i in range(oh):
            for j in range(ow):
                for c in range(c_count):
                    p = argmax[n, i, j, c] // kw
                    q = argmax[n, i, j, c] - p * kw
                    y[n, i, j, c] = x[n, i * sh + p, j * sw + q, c]


@numba.njit(cache=True)
def _maxpool_gather_2x2(x, argmax, y):
    n_count, oh, ow, c_count = y.shape
    for n in range(n_count):
        for i in range(oh):
            for j in range(ow):
                # 1-D views of the window's four pixels: the channel loop then vectorizes.
                arg, out = argmax[n, i, j], y[n, i, j]
                x0, x1 = x[n, 2 * i, 2 * j], x[n, 2 * i, 2 * j + 1]
                x2, x3 = x[n, 2 * i + 1, 2 * j], x[n, 2 * i + 1, 2 * j + 1]
                for c in range(c_count):
                    top = x0[c] if arg[c] == 0 else x1[c]
                    bottom = x2[c] if arg[c] == 2 else x3[c]
                    out[c] = top if arg[c] < 2 else bottom


def maxpool2d_gather(x, argmax, kh: int, kw: int, sh: int, sw: int):
    """See ``reference.maxpool2d_gather``: y (N, C, OH, OW), channels-last."""
    n, c, oh, ow = argmax.shape
    y = np.empty((n, oh, ow, c), x.dtype)
    x, argmax = _channels_last(x), _channels_last(argmax)
    if _is_2x2(kh, kw, sh, sw):
        _maxpool_gather_2x2(x, argmax, y)
    else:
        _maxpool_gather_any(x, argmax, kw, sh, sw, y)
    return y.transpose(0, 3, 1, 2)


# --- convolution windows: im2col and its adjoint col2im ---------------------------------------

# im2col is the reference's strided copy: a Numba loop copying the same windows is no faster
# (both move the im2col matrix at memory speed; benchmarks/PROFILE.md) and NumPy's copy also
# wins for few channels.
im2col = reference.im2col

# col2im: the innermost loop adds one pixel's C channels through 1-D views (gx[n, r, s],
# cols[n, i, j, p, q]); indices from range() are known non-negative, so LLVM vectorizes it
# (2-3x faster than the same loop on computed flat indices). The views cost a little per
# pixel: for a single channel the reference's offset-by-offset slice additions are faster;
# from a few channels on the loop wins (docs/performance.md, Kernels).


@numba.njit(cache=True)
def _col2im_channels_last(cols, sh, sw, ph, pw, gx):
    n_count, oh, ow, kh, kw, c_count = cols.shape
    _, h, w, _ = gx.shape
    gx[:] = 0.0
    # cols is read once, in memory order, each window element added onto its pixel: 2x
    # faster than gathering each pixel's window elements (scattered reads of the big array
    # and an integer division per window offset to find them).
    for n in range(n_count):
        for i in range(oh):
            for j in range(ow):
                for p in range(kh):
                    r = i * sh + p - ph
                    if r < 0 or r >= h:  # a padding row: dropped
                        continue
                    for q in range(kw):
                        s = j * sw + q - pw
                        if s < 0 or s >= w:
                            continue
                        pixel, window = gx[n, r, s], cols[n, i, j, p, q]
                        for c in range(c_count):
                            pixel[c] += window[c]


def col2im(cols, h: int, w: int, sh: int, sw: int, ph: int, pw: int):
    """See ``reference.col2im``: gx (N, C, h, w), channels-last."""
    n, c = cols.shape[0], cols.shape[-1]
    if c == 1:
        return reference.col2im(cols, h, w, sh, sw, ph, pw)
    gx = np.empty((n, h, w, c), cols.dtype)
    _col2im_channels_last(np.ascontiguousarray(cols), sh, sw, ph, pw, gx)
    return gx.transpose(0, 3, 1, 2)


# --- Winograd F(2x2, 3x3) tile transforms (see reference.py) ---------------------------------
# Each loop handles one tile at a time, its 16 (or 4) pixels as C-vectors; the innermost
# loops run over the channels through 1-D views, which LLVM vectorizes. The transforms are
# the reference's matrices written out as additions (BT, AT) and their transposes.


@numba.njit(cache=True)
def _winograd_input_tiles(padded, v):
    n_count, _, _, c_count = padded.shape
    th, tw = v.shape[2], v.shape[3]
    rows = np.empty((4, 4, c_count), padded.dtype)  # BT applied along the tile's rows
    for n in range(n_count):
        for a in range(th):
            for b in range(tw):
                for s in range(4):
                    x0, x1 = padded[n, 2 * a, 2 * b + s], padded[n, 2 * a + 1, 2 * b + s]
                    x2, x3 = padded[n, 2 * a + 2, 2 * b + s], padded[n, 2 * a + 3, 2 * b + s]
                    d0, d1, d2, d3 = rows[0, s], rows[1, s], rows[2, s], rows[3, s]
                    for c in range(c_count):
                        d0[c] = x0[c] - x2[c]
                        d1[c] = x1[c] + x2[c]
                        d2[c] = x2[c] - x1[c]
                        d3[c] = x1[c] - x3[c]
                for u in range(4):
                    e0, e1, e2, e3 = rows[u, 0], rows[u, 1], rows[u, 2], rows[u, 3]
                    o0, o1 = v[4 * u, n, a, b], v[4 * u + 1, n, a, b]
                    o2, o3 = v[4 * u + 2, n, a, b], v[4 * u + 3, n, a, b]
                    for c in range(c_count):
                        o0[c] = e0[c] - e2[c]
                        o1[c] = e1[c] + e2[c]
                        o2[c] = e2[c] - e1[c]
                        o3[c] = e1[c] - e3[c]


def winograd_input(x, ph: int, pw: int):
    """See ``reference.winograd_input``: (16, N, th, tw, C)."""
    n, c, h, w = x.shape
    _, _, th, tw = reference.winograd_tiles(h, w, ph, pw)
    padded = np.zeros((n, 2 * th + 2, 2 * tw + 2, c), x.dtype)
    padded[:, ph : ph + h, pw : pw + w, :] = x.transpose(0, 2, 3, 1)
    v = np.empty((16, n, th, tw, c), x.dtype)
    _winograd_input_tiles(padded, v)
    return v


@numba.njit(cache=True)
def _winograd_input_adjoint_tiles(v, padded):
    _, n_count, th, tw, c_count = v.shape
    cols = np.empty((4, 4, c_count), v.dtype)  # BT^T applied along the tile's columns
    padded[:] = 0.0
    for n in range(n_count):
        for a in range(th):
            for b in range(tw):
                for u in range(4):
                    v0, v1 = v[4 * u, n, a, b], v[4 * u + 1, n, a, b]
                    v2, v3 = v[4 * u + 2, n, a, b], v[4 * u + 3, n, a, b]
                    s0, s1, s2, s3 = cols[u, 0], cols[u, 1], cols[u, 2], cols[u, 3]
                    for c in range(c_count):
                        s0[c] = v0[c]
                        s1[c] = v1[c] - v2[c] + v3[c]
                        s2[c] = v1[c] + v2[c] - v0[c]
                        s3[c] = -v3[c]
                for s in range(4):
                    t0, t1, t2, t3 = cols[0, s], cols[1, s], cols[2, s], cols[3, s]
                    r0, r1 = padded[n, 2 * a, 2 * b + s], padded[n, 2 * a + 1, 2 * b + s]
                    r2, r3 = padded[n, 2 * a + 2, 2 * b + s], padded[n, 2 * a + 3, 2 * b + s]
                    for c in range(c_count):
                        r0[c] += t0[c]
                        r1[c] += t1[c] - t2[c] + t3[c]
                        r2[c] += t1[c] + t2[c] - t0[c]
                        r3[c] -= t3[c]


def winograd_input_adjoint(v, h: int, w: int, ph: int, pw: int):
    """See ``reference.winograd_input_adjoint``: gx (N, C, h, w), channels-last."""
    _, n, th, tw, c = v.shape
    padded = np.empty((n, 2 * th + 2, 2 * tw + 2, c), v.dtype)
    _winograd_input_adjoint_tiles(np.ascontiguousarray(v), padded)
    return np.ascontiguousarray(padded[:, ph : ph + h, pw : pw + w]).transpose(0, 3, 1, 2)


@numba.njit(cache=True)
def _winograd_output_tiles(m, y):
    _, n_count, th, tw, o_count = m.shape
    oh, ow = y.shape[1], y.shape[2]
    rows = np.empty((2, 4, o_count), m.dtype)  # AT applied along the tile's rows
    for n in range(n_count):
        for a in range(th):
            for b in range(tw):
                for v in range(4):
                    m0, m1 = m[v, n, a, b], m[4 + v, n, a, b]
                    m2, m3 = m[8 + v, n, a, b], m[12 + v, n, a, b]
                    t0, t1 = rows[0, v], rows[1, v]
                    for o in range(o_count):
                        t0[o] = m0[o] + m1[o] + m2[o]
                        t1[o] = m1[o] - m2[o] - m3[o]
                for i in range(2):
                    r = 2 * a + i
                    if r >= oh:  # the last tile of an odd output height
                        continue
                    q0, q1, q2, q3 = rows[i, 0], rows[i, 1], rows[i, 2], rows[i, 3]
                    y0 = y[n, r, 2 * b]
                    for o in range(o_count):
                        y0[o] = q0[o] + q1[o] + q2[o]
                    if 2 * b + 1 < ow:
                        y1 = y[n, r, 2 * b + 1]
                        for o in range(o_count):
                            y1[o] = q1[o] - q2[o] - q3[o]


def winograd_output(m, oh: int, ow: int):
    """See ``reference.winograd_output``: y (N, O, oh, ow), channels-last."""
    _, n, _, _, o = m.shape
    y = np.empty((n, oh, ow, o), m.dtype)
    _winograd_output_tiles(np.ascontiguousarray(m), y)
    return y.transpose(0, 3, 1, 2)


@numba.njit(cache=True)
def _winograd_output_adjoint_tiles(g, m):
    _, n_count, th, tw, o_count = m.shape
    rows = np.empty((2, 4, o_count), g.dtype)  # AT^T applied along the block's columns
    for n in range(n_count):
        for a in range(th):
            for b in range(tw):
                for i in range(2):
                    g0, g1 = g[n, 2 * a + i, 2 * b], g[n, 2 * a + i, 2 * b + 1]
                    c0, c1, c2, c3 = rows[i, 0], rows[i, 1], rows[i, 2], rows[i, 3]
                    for o in range(o_count):
                        c0[o] = g0[o]
                        c1[o] = g0[o] + g1[o]
                        c2[o] = g0[o] - g1[o]
                        c3[o] = -g1[o]
                for v in range(4):
                    t0, t1 = rows[0, v], rows[1, v]
                    m0, m1 = m[v, n, a, b], m[4 + v, n, a, b]
                    m2, m3 = m[8 + v, n, a, b], m[12 + v, n, a, b]
                    for o in range(o_count):
                        m0[o] = t0[o]
                        m1[o] = t0[o] + t1[o]
                        m2[o] = t0[o] - t1[o]
                        m3[o] = -t1[o]


def winograd_output_adjoint(gy, th: int, tw: int):
    """See ``reference.winograd_output_adjoint``: (16, N, th, tw, O)."""
    n, o, oh, ow = gy.shape
    if (oh, ow) == (2 * th, 2 * tw):
        g = _channels_last(gy)
    else:  # odd output sizes: the last tiles' missing outputs read zeros
        g = np.zeros((n, 2 * th, 2 * tw, o), gy.dtype)
        g[:, :oh, :ow] = gy.transpose(0, 2, 3, 1)
    m = np.empty((16, n, th, tw, o), gy.dtype)
    _winograd_output_adjoint_tiles(g, m)
    return m


# --- softmax cross-entropy from logits ------------------------------------------------------


@numba.njit(cache=True)
def _softmax_xent_rows(logits, labels, loss, probs):
    n_count, c_count = logits.shape
    for n in range(n_count):
        top = logits[n, 0]
        for c in range(1, c_count):
            top = max(top, logits[n, c])
        total = 0.0
        for c in range(c_count):
            e = np.exp(logits[n, c] - top)  # the max-shift: exp never overflows
            probs[n, c] = e
            total += e
        for c in range(c_count):
            probs[n, c] /= total
        loss[n] = np.log(total) - (logits[n, labels[n]] - top)


def softmax_xent_forward(logits, labels):
    """See ``reference.softmax_xent_forward``: loss (N,) and softmax(logits) (N, C)."""
    logits = np.ascontiguousarray(logits)
    loss = np.empty(logits.shape[0], logits.dtype)
    probs = np.empty_like(logits)
    _softmax_xent_rows(logits, np.ascontiguousarray(labels, dtype=np.int64), loss, probs)
    return loss, probs


@numba.njit(cache=True)
def _softmax_xent_backward_rows(probs, labels, gloss, glogits):
    n_count, c_count = probs.shape
    for n in range(n_count):
        for c in range(c_count):
            glogits[n, c] = probs[n, c] * gloss[n]
        glogits[n, labels[n]] -= gloss[n]


def softmax_xent_backward(probs, labels, gloss):
    """See ``reference.softmax_xent_backward``: glogits (N, C)."""
    probs = np.ascontiguousarray(probs)
    glogits = np.empty_like(probs)
    _softmax_xent_backward_rows(
        probs,
        np.ascontiguousarray(labels, dtype=np.int64),
        np.ascontiguousarray(gloss, dtype=probs.dtype),
        glogits,
    )
    return glogits


# --- elementwise steps of a training loop -----------------------------------------------------
#
# NumPy spells these as two passes with a temporary array in between (the mask x > 0, or
# lr * grad); each loop below reads its inputs and writes its output once. They run on flat
# views in memory order, so any dense layout (C order, channels-last) works without a copy;
# other layouts and mixed dtypes take the reference.


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# Below this many elements NumPy's two passes cost less than a call into compiled code
# (about 5 us of argument checks and dispatch; measured on W3's bias vectors).
_SMALL = 4096


def _memory_order(a):
    """a's axes from the slowest- to the fastest-varying in memory."""
    return sorted(range(a.ndim), key=lambda axis: -a.strides[axis])


def _flat_views(*arrays, min_size=None):
    """1-D views of the arrays, element k of each at the same index, when they have one float
    dtype (float32 or float64) and one dense memory layout and at least ``min_size`` elements
    (default ``_SMALL``); None otherwise (mixed dtypes, layouts that differ or are not dense,
    e.g. broadcast)."""
    first = arrays[0]
    if first.size < (_SMALL if min_size is None else min_size):  # first: the cheap test
        return None
    dtype = first.dtype
    if dtype is not _FLOATS[0] and dtype is not _FLOATS[1] and dtype not in _FLOATS:
        return None
    contiguous = True
    for a in arrays:  # a plain loop: any()/all() over generators cost more per optimizer step
        if a.dtype != dtype:
            return None
        contiguous = contiguous and a.flags.c_contiguous
    if not contiguous:
        order = _memory_order(first)
        arrays = [a.transpose(order) for a in arrays]
        for a in arrays:
            if not a.flags.c_contiguous:
                return None
    return [a.reshape(-1) for a in arrays]


def _empty_in_layout_of(a):
    """An uninitialised array shaped like ``a`` and laid out like it in memory, with a flat
    view in that memory order."""
    if a.flags.c_contiguous:
        out = np.empty(a.shape, a.dtype)
        return out, out.reshape(-1)
    order = _memory_order(a)
    out = np.empty([a.shape[axis] for axis in order], a.dtype)
    return out.transpose(np.argsort(order)), out.reshape(-1)


@numba.njit(cache=True)
def _relu_forward_flat(x, y):
    zero = x.dtype.type(0.0)
    for k in range(x.size):
        v = x[k]
        y[k] = v if (v > zero or v != v) else zero  # as np.maximum(x, 0): NaN kept, -0.0 -> +0.0


def relu_forward(x):
    """See ``reference.relu_forward``: y in x's dtype and memory layout. NumPy's maximum of
    an array and a scalar took about twice this loop's time on W3's activations
    (benchmarks/PROFILE.md, "ReLU's forward")."""
    flat = _flat_views(x)
    if flat is None:
        return reference.relu_forward(x)
    y, y_flat = _empty_in_layout_of(x)
    _relu_forward_flat(flat[0], y_flat)
    return y


@numba.njit(cache=True)
def _relu_backward_flat(gy, x, gx):
    zero = x.dtype.type(0.0)
    for k in range(gy.size):
        gx[k] = gy[k] * (x[k] > zero)  # a multiply, as the reference: a NaN in gy stays NaN


def relu_backward(gy, x):
    """See ``reference.relu_backward``: gx in gy's dtype and memory layout."""
    flat = _flat_views(gy, x)
    if flat is None:
        return reference.relu_backward(gy, x)
    gx, gx_flat = _empty_in_layout_of(gy)
    _relu_backward_flat(*flat, gx_flat)
    return gx


@numba.njit(cache=True)
def _sgd_update_flat(param, grad, lr):
    for k in range(param.size):
        param[k] -= lr * grad[k]


def sgd_update_(param, grad, lr: float):
    """See ``reference.sgd_update_``: param -= lr * grad in place, one pass over memory."""
    flat = _flat_views(param, grad)
    if flat is None:
        return reference.sgd_update_(param, grad, lr)
    _sgd_update_flat(*flat, param.dtype.type(lr))
    return param


# Adam's update is a dozen NumPy calls per parameter (see reference.adam_update_): the one
# compiled call costs less than those at every size, so it has no small-array cut-off.
_ADAM_SMALL = 0


# error_model="numpy": a division by zero gives inf or NaN as in NumPy (eps = 0 and a zero
# moment) instead of raising ZeroDivisionError, and without that check per division LLVM
# vectorizes the loop (square roots and quotients a SIMD register at a time).
@numba.njit(cache=True, error_model="numpy")
def _adam_update_flat(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    amsgrad,
    beta1,
    beta2,
    eps,
    step_size,
    bias_correction2_sqrt,
    weight_decay,
    param_decay,
):
    # The Python floats rounded to the arrays' dtype, as NumPy rounds them; 1 - beta is
    # formed in float64 first, as the reference's Python arithmetic does.
    real = param.dtype.type
    b1, keep1 = real(beta1), real(1.0 - beta1)
    b2, keep2 = real(beta2), real(1.0 - beta2)
    e, lr_t, bc2 = real(eps), real(step_size), real(bias_correction2_sqrt)
    wd, decay = real(weight_decay), real(param_decay)
    decoupled, coupled = param_decay != 1.0, weight_decay != 0.0
    for k in range(param.size):
        p = param[k]
        if decoupled:
            p = p * decay
        g = grad[k]
        if coupled:
            g = g + wd * p
        m = exp_avg[k] * b1 + keep1 * g
        v = exp_avg_sq[k] * b2 + (keep2 * g) * g
        exp_avg[k] = m
        exp_avg_sq[k] = v
        if amsgrad:
            v_max = max_exp_avg_sq[k]
            if not (v_max >= v or v_max != v_max):  # np.maximum: a NaN in either wins
                v_max = v
            max_exp_avg_sq[k] = v_max
            v = v_max
        denom = real(math.sqrt(v)) / bc2 + e
        param[k] = p + lr_t * (m / denom)


def adam_update_(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    bias_correction2_sqrt: float,
    weight_decay: float = 0.0,
    param_decay: float = 1.0,
):
    """See ``reference.adam_update_``: the same arithmetic in one pass over memory."""
    amsgrad = max_exp_avg_sq is not None
    arrays = (param, grad, exp_avg, exp_avg_sq) + ((max_exp_avg_sq,) if amsgrad else ())
    scalars = (beta1, beta2, eps, step_size, bias_correction2_sqrt, weight_decay, param_decay)
    flat = _flat_views(*arrays, min_size=_ADAM_SMALL)
    if flat is None:
        return reference.adam_update_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *scalars)
    max_flat = flat[4] if amsgrad else flat[3]  # not read without amsgrad
    _adam_update_flat(*flat[:4], max_flat, amsgrad, *scalars)
    return param


# --- recurrent cells --------------------------------------------------------------------------
# The transcendental functions run as NumPy's tanh over whole arrays: without Intel's SVML,
# Numba calls the scalar libm tanh per element, about 10x slower than NumPy's SIMD float32
# tanh on the W5 shapes (docs/performance.md, Kernels).
# The arithmetic between them is one fused Numba loop per stage. Sigmoids come from the same
# tanh pass as the reference's: sigmoid(x) = (tanh(x / 2) + 1) / 2.

_SCALES: dict = {}


def _half_scale(pattern: tuple, h_size: int, dtype):
    """A row (k * H,) holding 0.5 (a sigmoid's half argument) or 1.0 (a tanh) per gate."""
    key = (pattern, h_size, np.dtype(dtype))
    row = _SCALES.get(key)
    if row is None:
        row = _SCALES[key] = np.repeat(np.array(pattern, dtype=dtype), h_size)
    return row


def _lstm_activations(gates, h_size):
    """tanh(a_i / 2), tanh(a_f / 2), tanh(a_g), tanh(a_o / 2) as one (M, 4H) array."""
    act = np.multiply(gates, _half_scale((0.5, 0.5, 1.0, 0.5), h_size, gates.dtype))
    return np.tanh(act, out=act)


@numba.njit(cache=True)
def _lstm_cell_rows(act, c, c_out):
    m_count, h_size = c.shape
    for m in range(m_count):
        for j in range(h_size):
            i = 0.5 * (act[m, j] + 1.0)
            f = 0.5 * (act[m, h_size + j] + 1.0)
            c_out[m, j] = f * c[m, j] + i * act[m, 2 * h_size + j]


@numba.njit(cache=True)
def _lstm_hidden_rows(act, t, h_out):
    m_count, h_size = t.shape
    for m in range(m_count):
        for j in range(h_size):
            h_out[m, j] = 0.5 * (act[m, 3 * h_size + j] + 1.0) * t[m, j]


@numba.njit(cache=True)
def _lstm_backward_rows(act, c, t, gh, gc, dgates, dc):
    m_count, h_size = c.shape
    for m in range(m_count):
        for j in range(h_size):
            i = 0.5 * (act[m, j] + 1.0)
            f = 0.5 * (act[m, h_size + j] + 1.0)
            g = act[m, 2 * h_size + j]
            o = 0.5 * (act[m, 3 * h_size + j] + 1.0)
            tj = t[m, j]
            gct = gc[m, j] + gh[m, j] * o * (1.0 - tj * tj)
            dgates[m, j] = gct * g * i * (1.0 - i)
            dgates[m, h_size + j] = gct * c[m, j] * f * (1.0 - f)
            dgates[m, 2 * h_size + j] = gct * i * (1.0 - g * g)
            dgates[m, 3 * h_size + j] = gh[m, j] * tj * o * (1.0 - o)
            dc[m, j] = gct * f


def lstm_pointwise_forward(gates, c):
    """See ``reference.lstm_pointwise_forward``: h', c' (M, H)."""
    c = np.ascontiguousarray(c)
    act = _lstm_activations(gates, c.shape[1])
    c_out = np.empty(c.shape, c.dtype)
    _lstm_cell_rows(act, c, c_out)
    t = np.tanh(c_out)
    _lstm_hidden_rows(act, t, t)  # h' = o t, written over t
    return t, c_out


def lstm_pointwise_backward(gates, c, gh, gc, out=None):
    """See ``reference.lstm_pointwise_backward``: dgates (M, 4H) (into ``out`` if given),
    dc (M, H)."""
    c = np.ascontiguousarray(c)
    act = _lstm_activations(gates, c.shape[1])
    t = np.empty(c.shape, c.dtype)
    _lstm_cell_rows(act, c, t)
    np.tanh(t, out=t)
    dgates = np.empty(gates.shape, gates.dtype) if out is None else out
    dc = np.empty(c.shape, c.dtype)
    _lstm_backward_rows(act, c, t, _c(gh), _c(gc), dgates, dc)
    return dgates, dc


def _gru_gates(gi, gh, h_size):
    """tanh((gi + gh) / 2) of the r and z parts, (M, 2H): the two sigmoids' tanh pass."""
    rz = np.add(gi[:, : 2 * h_size], gh[:, : 2 * h_size])
    rz *= rz.dtype.type(0.5)
    return np.tanh(rz, out=rz)


@numba.njit(cache=True)
def _gru_candidate_rows(gi, gh, rz, pre_n):
    m_count, h_size = pre_n.shape
    for m in range(m_count):
        for j in range(h_size):
            r = 0.5 * (rz[m, j] + 1.0)
            pre_n[m, j] = gi[m, 2 * h_size + j] + r * gh[m, 2 * h_size + j]


@numba.njit(cache=True)
def _gru_forward_rows(rz, n, h, h_out):
    m_count, h_size = h.shape
    for m in range(m_count):
        for j in range(h_size):
            z = 0.5 * (rz[m, h_size + j] + 1.0)
            h_out[m, j] = n[m, j] + z * (h[m, j] - n[m, j])


@numba.njit(cache=True)
def _gru_backward_rows(gh, rz, n, h, gy, dgi, dgh, dh):
    m_count, h_size = h.shape
    for m in range(m_count):
        for j in range(h_size):
            hn = gh[m, 2 * h_size + j]
            r = 0.5 * (rz[m, j] + 1.0)
            z = 0.5 * (rz[m, h_size + j] + 1.0)
            nj = n[m, j]
            dn = gy[m, j] * (1.0 - z) * (1.0 - nj * nj)
            dr = dn * hn * r * (1.0 - r)
            dz = gy[m, j] * (h[m, j] - nj) * z * (1.0 - z)
            dgi[m, j] = dgh[m, j] = dr
            dgi[m, h_size + j] = dgh[m, h_size + j] = dz
            dgi[m, 2 * h_size + j] = dn
            dgh[m, 2 * h_size + j] = dn * r
            dh[m, j] = gy[m, j] * z


def _gru_pass(gi, gh, h):
    gi, gh, h = _c(gi), _c(gh), _c(h)
    rz = _gru_gates(gi, gh, h.shape[1])
    n = np.empty(h.shape, h.dtype)
    _gru_candidate_rows(gi, gh, rz, n)
    return gi, gh, h, rz, np.tanh(n, out=n)


def gru_pointwise_forward(gi, gh, h):
    """See ``reference.gru_pointwise_forward``: h' (M, H)."""
    gi, gh, h, rz, n = _gru_pass(gi, gh, h)
    h_out = np.empty(h.shape, h.dtype)
    _gru_forward_rows(rz, n, h, h_out)
    return h_out


def gru_pointwise_backward(gi, gh, h, gy):
    """See ``reference.gru_pointwise_backward``: dgi, dgh (M, 3H), dh (M, H)."""
    gi, gh, h, rz, n = _gru_pass(gi, gh, h)
    dgi, dgh, dh = np.empty(gi.shape, gi.dtype), np.empty(gh.shape, gh.dtype), np.empty_like(h)
    _gru_backward_rows(gh, rz, n, h, _c(gy), dgi, dgh, dh)
    return dgi, dgh, dh


def _c(a):
    return np.ascontiguousarray(a)


@numba.njit(cache=True)
def _erf_flat(x, y):
    for k in range(x.size):
        y[k] = math.erf(x[k])


def erf(x):
    """See ``reference.erf``: math.erf per element, in x's dtype."""
    out = np.empty(x.shape, x.dtype)
    _erf_flat(_c(x).reshape(-1), out.reshape(-1))
    return out
