"""Vectorized references for every kernel: the definitions the compiled kernels are tested against.

Written with array methods and operators only (plus ``_array_module`` where a function is
needed), so the same code runs on NumPy and CuPy arrays: on a GPU this *is* the implementation.
Shapes and dtypes are checked by the public wrappers in ``kernels/__init__.py``.
"""

from __future__ import annotations

import numpy as np


def _array_module(a):
    """NumPy for host arrays, CuPy for device arrays (CuPy is imported only when seen)."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def _per_channel(a):
    """A (T, C) array as (T, 1, C, 1), to broadcast against a (T, N, C, S) array."""
    return a.reshape(a.shape[0], 1, a.shape[1], 1)


# --- batch normalisation over (T, N, C, S): statistics per (task t, channel c) ---------------


def bn_stats(x, eps: float):
    """mean and inv_std = 1 / sqrt(var + eps) (biased var) of x (T, N, C, S) per (t, c)."""
    mean = x.mean(axis=(1, 3))
    centred = x - _per_channel(mean)
    return mean, ((centred * centred).mean(axis=(1, 3)) + eps) ** -0.5


def bn_forward(x, weight, bias, eps: float):
    """y = (x - mean) * inv_std * weight + bias, inv_std = 1 / sqrt(var + eps), per (t, c).

    x is (T, N, C, S); weight and bias are (T, C). Returns y (T, N, C, S) and the
    batch mean and inv_std (T, C), all in x's dtype.
    """
    mean = x.mean(axis=(1, 3))
    centred = x - _per_channel(mean)
    var = (centred * centred).mean(axis=(1, 3))
    inv_std = (var + eps) ** -0.5
    y = centred * _per_channel(inv_std * weight) + _per_channel(bias)
    return y, mean, inv_std


def bn_backward(gy, x, mean, inv_std, weight):
    """gx = w * inv_std / n * (n * gy - gb - xhat * gw), gw = sum(gy * xhat), gb = sum(gy).

    xhat = (x - mean) * inv_std is recomputed from x; sums run over (N, S), n = N * S.
    Returns gx (T, N, C, S) and gw, gb (T, C).
    """
    n = x.shape[1] * x.shape[3]
    xhat = (x - _per_channel(mean)) * _per_channel(inv_std)
    gb = gy.sum(axis=(1, 3))
    gw = (gy * xhat).sum(axis=(1, 3))
    scale = _per_channel(weight * inv_std * (1.0 / n))
    gx = scale * (n * gy - _per_channel(gb) - xhat * _per_channel(gw))
    return gx, gw, gb


def bn_double_backward(gy, x, mean, inv_std, weight, ggx, ggw, ggb, need_gy=True, need_x=True):
    """The derivatives of <ggx, gx> + <ggw, gw> + <ggb, gb> (gx, gw, gb from ``bn_backward``).

    With s = inv_std, xhat = (x - mean) s, P(v) = v - mean(v) - xhat mean(v xhat) (sums over
    (N, S), n = N * S), A = ggx, B = gy, m_A = mean(A xhat), m_B = mean(B xhat) and
    c = mean(A P(B)) (so gw's partner: <A, s P(B)> = s n c):

        g_gy = w s P(A) + ggw xhat + ggb
        g_x  = -w s^2 (m_B P(A) + m_A P(B) + c xhat) + s ggw P(B)
        g_w  = s n c

    ``ggx``, ``ggw`` and ``ggb`` may be None (zero); ``weight``, ``ggw``, ``ggb``, ``mean`` and
    ``inv_std`` are (T, C). Returns g_gy and g_x (T, N, C, S), each None unless needed, and
    g_w (T, C).

    This is the one place the rule is written. Besides arrays it runs on tinymeta tensors
    (it uses only operators and the ``mean`` and ``reshape`` methods): tinymeta/nn/batchnorm.py
    records it from differentiable ops when the second derivatives must be differentiated
    again. The Numba kernel is tested against it.
    """
    n = x.shape[1] * x.shape[3]
    s = _per_channel(inv_std)
    xhat = (x - _per_channel(mean)) * s

    def project(v):
        m_v = (v * xhat).mean(axis=(1, 3), keepdims=True)
        return v - v.mean(axis=(1, 3), keepdims=True) - xhat * m_v, m_v

    p_b, m_b = project(gy)
    g_gy = g_x = None
    g_w = 0.0 * inv_std
    if ggx is not None:
        p_a, m_a = project(ggx)
        c = (ggx * p_b).mean(axis=(1, 3), keepdims=True)
        ws = _per_channel(weight) * s
        g_gy = ws * p_a if need_gy else None
        g_x = -ws * s * (m_b * p_a + m_a * p_b + c * xhat) if need_x else None
        g_w = inv_std * n * c.reshape(inv_std.shape)
    if ggw is not None:
        ggw = _per_channel(ggw)
        if need_gy:
            g_gy = ggw * xhat if g_gy is None else g_gy + ggw * xhat
        if need_x:
            g_x = s * ggw * p_b if g_x is None else g_x + s * ggw * p_b
    if ggb is not None and need_gy:
        ggb = _per_channel(ggb)
        g_gy = ggb + 0.0 * xhat if g_gy is None else g_gy + ggb
    if need_gy and g_gy is None:
        g_gy = 0.0 * xhat
    if need_x and g_x is None:
        g_x = 0.0 * xhat
    return g_gy, g_x, g_w


# --- max-pooling with the arg-max of every window ---------------------------------------------


def maxpool2d_argmax(x, kh: int, kw: int, sh: int, sw: int):
    """y[n,c,i,j] = max_{p,q} x[n,c,i*sh+p,j*sw+q] and argmax = the winning p * kw + q.

    Ties go to the first maximal offset in row-major order. The arg-max is int8 (int32 for
    windows of 128 elements or more). Loops over the kh * kw offsets, never over pixels.
    """
    xp = _array_module(x)
    oh, ow = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    y = argmax = None
    for p in range(kh):
        for q in range(kw):
            v = x[:, :, p : p + sh * (oh - 1) + 1 : sh, q : q + sw * (ow - 1) + 1 : sw]
            if y is None:
                y = v.copy(order="K")  # order K: keep x's (channels-last) memory layout
                argmax = xp.zeros_like(y, dtype=np.int8 if kh * kw < 128 else np.int32)
            else:
                better = v > y  # strictly: a tie keeps the earlier offset
                # argmax = where(better, offset, argmax) in arithmetic: masked assignment is
                # several times slower on channels-last layouts (a Python int keeps int8).
                argmax += better * (p * kw + q - argmax)
                xp.maximum(y, v, out=y)
    return y, argmax


def _window_offsets(h: int, w: int, kh: int, kw: int, sh: int, sw: int):
    """(p * kw + q, rows, cols) for each window offset (p, q) of an (h, w) image: the slices
    of the image that this offset of every window reads, one element per window."""
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    for p in range(kh):
        for q in range(kw):
            rows = slice(p, p + sh * (oh - 1) + 1, sh)
            yield p * kw + q, rows, slice(q, q + sw * (ow - 1) + 1, sw)


def maxpool2d_scatter(gy, argmax, kh: int, kw: int, sh: int, sw: int, h: int, w: int):
    """gx (N, C, h, w) = zeros, plus gy[n,c,i,j] at x[n,c,i*sh+p,j*sw+q] for the arg-max
    offset p * kw + q of window (i, j) (added up where overlapping windows share a maximum).
    The adjoint of ``maxpool2d_gather``."""
    xp = _array_module(gy)
    n, c = gy.shape[:2]
    gx = xp.zeros((n, h, w, c), dtype=gy.dtype).transpose(0, 3, 1, 2)  # channels-last
    for i, rows, cols in _window_offsets(h, w, kh, kw, sh, sw):
        gx[:, :, rows, cols] += gy * (argmax == i)
    return gx


def maxpool2d_gather(x, argmax, kh: int, kw: int, sh: int, sw: int):
    """y[n,c,i,j] = x[n,c,i*sh+p,j*sw+q] at the arg-max offset p * kw + q of window (i, j)."""
    y = _array_module(x).zeros_like(argmax, dtype=x.dtype)  # argmax's (channels-last) layout
    for i, rows, cols in _window_offsets(*x.shape[2:], kh, kw, sh, sw):
        y += x[:, :, rows, cols] * (argmax == i)
    return y


# --- convolution windows: im2col and its adjoint col2im ---------------------------------------


def im2col(x, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int):
    """cols[n,i,j,p,q,c] = x_pad[n,c,i*sh+p,j*sw+q]: every kh x kw window of x (N, C, H, W),
    zero-padded by ph rows and pw columns on each side, as a C-contiguous
    (N, OH, OW, kh, kw, C) array (so (N*OH*OW, kh*kw*C) is a free reshape: the GEMM operand).

    The windows are a strided view of the padded NHWC copy of x (no copy), then copied once;
    with x channels-last, each window row is a run of kw * C contiguous floats.
    """
    xp = _array_module(x)
    n, c, h, w = x.shape
    padded = xp.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=x.dtype)
    padded[:, ph : ph + h, pw : pw + w, :] = x.transpose(0, 2, 3, 1)
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    s0, s1, s2, s3 = padded.strides
    shape, strides = (n, oh, ow, kh, kw, c), (s0, s1 * sh, s2 * sw, s1, s2, s3)
    if xp is np:
        windows = np.lib.stride_tricks.as_strided(padded, shape, strides, writeable=False)
    else:  # CuPy's as_strided takes no writeable= argument
        windows = xp.lib.stride_tricks.as_strided(padded, shape, strides)
    return xp.ascontiguousarray(windows)


def col2im(cols, h: int, w: int, sh: int, sw: int, ph: int, pw: int):
    """gx[n,c,r,s] = sum of cols[n,i,j,p,q,c] over the windows (i, j) and offsets (p, q) with
    i*sh+p-ph = r and j*sw+q-pw = s: the adjoint of ``im2col`` (each window element goes back
    to the input pixel it was copied from; padding drops out). cols is (N, OH, OW, kh, kw, C);
    gx is (N, C, h, w), channels-last in memory."""
    xp = _array_module(cols)
    n, oh, ow, kh, kw, c = cols.shape
    padded = xp.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=cols.dtype)
    for i, rows, columns in _window_offsets(h + 2 * ph, w + 2 * pw, kh, kw, sh, sw):
        padded[:, rows, columns, :] += cols[:, :, :, i // kw, i % kw, :]
    return padded[:, ph : ph + h, pw : pw + w, :].transpose(0, 3, 1, 2)


# --- Winograd F(2x2, 3x3): the tile transforms of a 3x3 stride-1 convolution -----------------
#
# A 3x3 convolution computes each 2x2 block of outputs from a 4x4 tile of the (padded) input;
# Winograd's F(2x2, 3x3) does it with 16 products per (input, output) channel pair instead of
# 36: y_tile = AT [ (G w G^T) . (BT d BT^T) ] AT^T, summed over the input channels, where the
# channel sums of the 16 elementwise products are 16 matrix products. The input transform
# maps the tiles (overlapping by 2, stride 2) to (16, N, th, tw, C); the output transform maps
# the 16 products (16, N, th, tw, O) back to (N, O, oh, ow). The adjoints of both serve the
# convolution's input and weight gradients. All transforms use 0, +-1 and +-1/2: exact scalings.

WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))


def winograd_tiles(h: int, w: int, ph: int, pw: int) -> tuple:
    """(oh, ow, th, tw): a 3x3 stride-1 convolution's output size and its 2x2 output tiles."""
    oh, ow = h + 2 * ph - 2, w + 2 * pw - 2
    return oh, ow, (oh + 1) // 2, (ow + 1) // 2


def _both_sides(matrix, a, xp):
    """sum_{r,s} M[u,r] M[v,s] a[r,s,...] for a (k, k, ...) array: (u, v, ...)."""
    m = xp.asarray(matrix, dtype=a.dtype)
    return xp.tensordot(m, xp.tensordot(m, a, axes=([1], [1])), axes=([1], [1]))


def winograd_input(x, ph: int, pw: int):
    """V[4u+v, n, a, b, c] = sum_{r,s} BT[u,r] BT[v,s] x_pad[n, c, 2a+r, 2b+s]: the 4x4 input
    tiles (stride 2) of x (N, C, H, W) zero-padded by (ph, pw), transformed: (16, N, th, tw, C)."""
    xp = _array_module(x)
    n, c, h, w = x.shape
    _, _, th, tw = winograd_tiles(h, w, ph, pw)
    padded = xp.zeros((n, 2 * th + 2, 2 * tw + 2, c), dtype=x.dtype)
    padded[:, ph : ph + h, pw : pw + w, :] = x.transpose(0, 2, 3, 1)
    tiles = xp.stack(
        [
            xp.stack([padded[:, r : r + 2 * th : 2, s : s + 2 * tw : 2] for s in range(4)])
            for r in range(4)
        ]
    )  # (4, 4, N, th, tw, C)
    return xp.ascontiguousarray(_both_sides(WINOGRAD_BT, tiles, xp).reshape((16, n, th, tw, c)))


def winograd_input_adjoint(v, h: int, w: int, ph: int, pw: int):
    """gx (N, C, h, w), channels-last: the adjoint of ``winograd_input`` applied to
    v (16, N, th, tw, C); overlapping tiles add up, padding drops out."""
    xp = _array_module(v)
    _, n, th, tw, c = v.shape
    tiles = _both_sides(np.transpose(WINOGRAD_BT), v.reshape((4, 4, n, th, tw, c)), xp)
    padded = xp.zeros((n, 2 * th + 2, 2 * tw + 2, c), dtype=v.dtype)
    for r in range(4):
        for s in range(4):
            padded[:, r : r + 2 * th : 2, s : s + 2 * tw : 2] += tiles[r, s]
    return xp.ascontiguousarray(padded[:, ph : ph + h, pw : pw + w]).transpose(0, 3, 1, 2)


def winograd_output(m, oh: int, ow: int):
    """y[n, o, 2a+i, 2b+j] = sum_{u,v} AT[i,u] AT[j,v] m[4u+v, n, a, b, o] for m
    (16, N, th, tw, O), cropped to (N, O, oh, ow); channels-last in memory."""
    xp = _array_module(m)
    _, n, th, tw, o = m.shape
    blocks = _both_sides(WINOGRAD_AT, m.reshape((4, 4, n, th, tw, o)), xp)  # (2, 2, N, th, tw, O)
    y = blocks.transpose(2, 3, 0, 4, 1, 5).reshape((n, 2 * th, 2 * tw, o))
    return xp.ascontiguousarray(y[:, :oh, :ow]).transpose(0, 3, 1, 2)


def winograd_output_adjoint(gy, th: int, tw: int):
    """The adjoint of ``winograd_output``: gy (N, O, oh, ow) to (16, N, th, tw, O)."""
    xp = _array_module(gy)
    n, o, oh, ow = gy.shape
    padded = xp.zeros((n, 2 * th, 2 * tw, o), dtype=gy.dtype)
    padded[:, :oh, :ow] = gy.transpose(0, 2, 3, 1)
    blocks = padded.reshape((n, th, 2, tw, 2, o)).transpose(2, 4, 0, 1, 3, 5)  # (2, 2, N, ...)
    m = _both_sides(np.transpose(WINOGRAD_AT), blocks, xp)
    return xp.ascontiguousarray(m.reshape((16, n, th, tw, o)))


# --- softmax cross-entropy from logits ------------------------------------------------------


def softmax_xent_forward(logits, labels):
    """loss_n = logsumexp(logits_n) - logits_n[labels_n], and softmax(logits) (N, C).

    The max-shift keeps exp from overflowing; both results are in the logits' dtype.
    """
    xp = _array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = xp.exp(shifted)
    total = e.sum(axis=1, keepdims=True)
    rows = xp.arange(logits.shape[0])
    loss = xp.log(total[:, 0]) - shifted[rows, labels]
    return loss, e / total


def softmax_xent_backward(probs, labels, gloss):
    """glogits = gloss_n * (softmax(logits)_n - onehot(labels_n))."""
    xp = _array_module(probs)
    g = probs * gloss[:, None]
    rows = xp.arange(probs.shape[0])
    g[rows, labels] -= gloss
    return g


# --- elementwise steps of a training loop ---------------------------------------------------


def relu_forward(x):
    """y = max(x, 0), NumPy's maximum: NaN stays NaN, -0.0 becomes +0.0."""
    return _array_module(x).maximum(x, 0)


def relu_backward(gy, x):
    """gx = gy * [x > 0]: the ReLU's gradient; the derivative at 0 is taken as 0."""
    return gy * (x > 0)


def sgd_update_(param, grad, lr: float):
    """param -= lr * grad, in place, with lr rounded to param's dtype first (what
    ``param -= lr * grad`` does for a Python float lr); returns param."""
    param -= param.dtype.type(lr) * grad
    return param


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
    """One Adam step of one parameter, every array changed in place; returns param::

        param = param * param_decay                       (AdamW's decoupled weight decay)
        g = grad + weight_decay * param                   (Adam's weight decay, if not 0)
        exp_avg = exp_avg * beta1 + (1 - beta1) * g
        exp_avg_sq = exp_avg_sq * beta2 + ((1 - beta2) * g) * g
        max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq)  (amsgrad; None without)
        param = param + step_size * (exp_avg / (sqrt(v) / bias_correction2_sqrt + eps))

    with v the max with amsgrad, else exp_avg_sq: the arithmetic of ``tinymeta.optim.Adam``.
    Each product, sum, quotient and square root rounds to the arrays' dtype in this order, and
    every Python float is rounded to that dtype first (NumPy's rule for a Python scalar); the
    compiled loop reproduces this bit for bit.
    """
    xp = _array_module(param)
    if param_decay != 1.0:  # x * 1 == x: skipping it changes no bit
        param *= param_decay
    if weight_decay != 0:
        grad = grad + weight_decay * param  # a new array: the caller's grad is left alone
    exp_avg *= beta1
    exp_avg += (1 - beta1) * grad
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * grad * grad
    if max_exp_avg_sq is not None:
        xp.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = xp.sqrt(second_moment) / bias_correction2_sqrt + eps
    param += step_size * (exp_avg / denom)
    return param


# --- recurrent cells: the elementwise gate math of one time step ------------------------------
# Rows are (M, k * H) gate pre-activations in PyTorch's order (LSTM i, f, g, o; GRU r, z, n).


def _sigmoid(x, xp):
    # tanh form: exp(-x) would overflow (and warn) for very negative x.
    return 0.5 * (xp.tanh(0.5 * x) + 1.0)


def lstm_pointwise_forward(gates, c):
    """i, f, o = sigmoid(gates_i, _f, _o), g = tanh(gates_g); c' = f c + i g, h' = o tanh(c').

    gates (M, 4H), c (M, H); returns h', c' (M, H)."""
    xp = _array_module(gates)
    h_size = c.shape[-1]
    ai, af, ag, ao = (gates[:, k * h_size : (k + 1) * h_size] for k in range(4))
    c_new = _sigmoid(af, xp) * c + _sigmoid(ai, xp) * xp.tanh(ag)
    return _sigmoid(ao, xp) * xp.tanh(c_new), c_new


def lstm_pointwise_backward(gates, c, gh, gc, out=None):
    """The gradients of ``lstm_pointwise_forward`` for gh, gc (of h', c'): with t = tanh(c'),
    gc' = gc + gh o (1 - t^2), the pre-activations get gc' g i(1-i), gc' c f(1-f),
    gc' i (1-g^2), gh t o(1-o), and c gets gc' f. Returns dgates (M, 4H) (written into ``out``
    if given) and dc (M, H)."""
    xp = _array_module(gates)
    h_size = c.shape[-1]
    ai, af, ag, ao = (gates[:, k * h_size : (k + 1) * h_size] for k in range(4))
    i, f, o, g = _sigmoid(ai, xp), _sigmoid(af, xp), _sigmoid(ao, xp), xp.tanh(ag)
    t = xp.tanh(f * c + i * g)
    gct = gc + gh * o * (1.0 - t * t)
    dgates = xp.concatenate(
        [gct * g * i * (1.0 - i), gct * c * f * (1.0 - f), gct * i * (1.0 - g * g),
         gh * t * o * (1.0 - o)],
        axis=1,
    )  # fmt: skip
    if out is not None:
        out[...] = dgates
        dgates = out
    return dgates, gct * f


def gru_pointwise_forward(gi, gh, h):
    """r, z = sigmoid(gi_r + gh_r, gi_z + gh_z), n = tanh(gi_n + r gh_n); h' = (1 - z) n + z h.

    gi = x W_ih^T + b_ih and gh = h W_hh^T + b_hh, both (M, 3H); h (M, H); returns h'."""
    xp = _array_module(gi)
    h_size = h.shape[-1]
    r = _sigmoid(gi[:, :h_size] + gh[:, :h_size], xp)
    z = _sigmoid(gi[:, h_size : 2 * h_size] + gh[:, h_size : 2 * h_size], xp)
    n = xp.tanh(gi[:, 2 * h_size :] + r * gh[:, 2 * h_size :])
    return n + z * (h - n)


def gru_pointwise_backward(gi, gh, h, gy):
    """The gradients of ``gru_pointwise_forward`` for gy (of h'): with dn = gy (1 - z)(1 - n^2),
    both gi and gh get gy (h - n) z(1-z) for z and dn gh_n r(1-r) for r; gi_n gets dn and
    gh_n gets dn r; h gets gy z. Returns dgi, dgh (M, 3H) and dh (M, H)."""
    xp = _array_module(gi)
    h_size = h.shape[-1]
    hn = gh[:, 2 * h_size :]
    r = _sigmoid(gi[:, :h_size] + gh[:, :h_size], xp)
    z = _sigmoid(gi[:, h_size : 2 * h_size] + gh[:, h_size : 2 * h_size], xp)
    n = xp.tanh(gi[:, 2 * h_size :] + r * hn)
    dn = gy * (1.0 - z) * (1.0 - n * n)
    dr = dn * hn * r * (1.0 - r)
    dz = gy * (h - n) * z * (1.0 - z)
    return (
        xp.concatenate([dr, dz, dn], axis=1),
        xp.concatenate([dr, dz, dn * r], axis=1),
        gy * z,
    )


# --- special functions ------------------------------------------------------------------------


def erf(x):
    """The error function 2/sqrt(pi) int_0^x exp(-t^2) dt, elementwise, in x's dtype."""
    if type(x).__module__.startswith("cupy"):
        import cupyx.scipy.special

        return cupyx.scipy.special.erf(x)
    try:
        from scipy.special import erf as scipy_erf
    except ImportError:  # SciPy is optional: math.erf element by element (slow, exact)
        import math

        return np.vectorize(math.erf, otypes=[x.dtype])(x).astype(x.dtype, copy=False)
    return scipy_erf(x).astype(x.dtype, copy=False)
