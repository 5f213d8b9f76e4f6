"""Numba kernels: the loops behind ``tinymeta.kernels`` on the CPU.

Each public function here takes the same arrays as its twin in ``reference.py`` (any strides,
float32 or float64) and returns the same values. Inside, the loops run over C-contiguous
arrays with the channel axis innermost: tinymeta's NCHW arrays are channels-last in memory
(see tinymeta/nn/conv.py), so that view costs no copy for them, and the innermost loop walks
contiguous memory, which LLVM vectorizes. Other layouts are copied into it once.

Compiled once per dtype (``cache=True`` keeps the machine code on disk between runs); no
fastmath, so results follow IEEE arithmetic like the reference; no ``parallel=True`` (not
measured to help yet: the 2-core machines this project targets are shared, and the single-thread
loops already run at memory speed). Sums are accumulated in float64 whatever the input dtype.
"""

from __future__ import annotations

import numba
import numpy as np

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


@numba.njit(cache=True)
def _maxpool_channels_last(x, kh, kw, sh, sw, y, argmax):
    n_count, oh, ow, c_count = y.shape
    for n in range(n_count):
        for i in range(oh):
            for j in range(ow):
                for c in range(c_count):
                    y[n, i, j, c] = x[n, i * sh, j * sw, c]
                    argmax[n, i, j, c] = 0
                for p in range(kh):
                    for q in range(kw):
                        if p == 0 and q == 0:
                            continue
                        for c in range(c_count):
                            v = x[n, i * sh + p, j * sw + q, c]
                            if v > y[n, i, j, c]:  # strictly: a tie keeps the earlier offset
                                y[n, i, j, c] = v
                                argmax[n, i, j, c] = p * kw + q


def maxpool2d_argmax(x, kh: int, kw: int, sh: int, sw: int):
    """See ``reference.maxpool2d_argmax``: y and argmax (N, C, OH, OW), channels-last."""
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    y = np.empty((n, oh, ow, c), x.dtype)
    argmax = np.empty((n, oh, ow, c), np.int8 if kh * kw < 128 else np.int32)
    _maxpool_channels_last(_channels_last(x), kh, kw, sh, sw, y, argmax)
    return y.transpose(0, 3, 1, 2), argmax.transpose(0, 3, 1, 2)


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
