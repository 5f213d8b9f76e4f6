"""tinymeta.kernels: every Numba kernel against its vectorized NumPy reference, in float32 and
float64, on contiguous, channels-last and strided (non-contiguous) inputs of Hypothesis-drawn
shapes; the references against plain definitions; backend selection and argument errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tinymeta.kernels import reference

import tinymeta as tm
from tinymeta import kernels
from tinymeta.testing import check_grads
from tinymeta.testing import strategies as tms

numba_impl = pytest.importorskip("tinymeta.kernels.numba_impl")

DTYPES = [np.float32, np.float64]
# Same math in a different order (float64 sums in the kernels, pairwise sums in NumPy).
TOL = {np.float32: {"rtol": 2e-4, "atol": 2e-5}, np.float64: {"rtol": 1e-10, "atol": 1e-12}}


def _close(a, b, dtype):
    assert a.dtype == np.dtype(dtype) and a.shape == b.shape
    np.testing.assert_allclose(a, b, **TOL[dtype])


def _in_layout(array, layout: str, channel_axis: int):
    """The same values as ``array``, in another memory layout: ``contiguous`` (C order),
    ``channels_last`` (the channel axis innermost in memory, as tinymeta's convolutions leave
    NCHW arrays) or ``strided`` (every other element of a bigger array: no axis contiguous)."""
    if layout == "contiguous":
        return np.ascontiguousarray(array)
    if layout == "channels_last":
        order = [a for a in range(array.ndim) if a != channel_axis] + [channel_axis]
        return np.ascontiguousarray(array.transpose(order)).transpose(np.argsort(order))
    big = np.zeros(array.shape[:-1] + (2 * array.shape[-1],), array.dtype)
    big[..., ::2] = array
    return big[..., ::2]


LAYOUTS = ["contiguous", "channels_last", "strided"]


@st.composite
def bn_arrays(draw, n_arrays: int = 1):
    """``n_arrays`` arrays of one (T, N, C, S) shape, a dtype and a layout."""
    shape = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 5)),
        draw(st.integers(1, 6)),
    )
    if shape[1] * shape[3] < 2:
        shape = (shape[0], 2, shape[2], shape[3])
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    arrays = []
    for _ in range(n_arrays):
        a = (rng.standard_normal(shape) * rng.uniform(0.1, 3) + rng.uniform(-2, 2)).astype(dtype)
        arrays.append(_in_layout(a, layout, channel_axis=2))
    return arrays, dtype, rng


def _params(rng, t, c, dtype, per_task: bool):
    shape = (t, c) if per_task else (c,)
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)


# --- batch norm -------------------------------------------------------------------------------


@given(case=bn_arrays(), per_task=st.booleans())
def test_bn_forward_numba_matches_reference(case, per_task):
    (x,), dtype, rng = case
    t, _, c, _ = x.shape
    w, b = _params(rng, t, c, dtype, per_task)
    w2, b2 = np.broadcast_to(w, (t, c)), np.broadcast_to(b, (t, c))
    for got, want in zip(
        numba_impl.bn_forward(x, w2, b2, 1e-5), reference.bn_forward(x, w2, b2, 1e-5)
    ):
        _close(got, want, dtype)
    for got, want in zip(numba_impl.bn_stats(x, 1e-5), reference.bn_stats(x, 1e-5)):
        _close(got, want, dtype)


@given(case=bn_arrays(n_arrays=2), per_task=st.booleans())
def test_bn_backward_numba_matches_reference(case, per_task):
    (x, gy), dtype, rng = case
    t, _, c, _ = x.shape
    w, _ = _params(rng, t, c, dtype, per_task)
    w2 = np.broadcast_to(w, (t, c))
    mean, inv_std = reference.bn_stats(x, 1e-5)
    got = numba_impl.bn_backward(gy, x, mean, inv_std, w2)
    want = reference.bn_backward(gy, x, mean, inv_std, w2)
    scale = float(np.abs(want[0]).max()) + 1.0  # gx is a difference of O(n) terms
    for g, r in zip(got, want):
        assert g.dtype == np.dtype(dtype)
        np.testing.assert_allclose(g, r, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)


def test_bn_reference_matches_the_definition():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 4)) * 2 + 1
    w, b = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    y, mean, inv_std = reference.bn_forward(x, w, b, 1e-5)
    for t in range(2):
        for c in range(3):
            v = x[t, :, c, :]
            np.testing.assert_allclose(mean[t, c], v.mean())
            np.testing.assert_allclose(inv_std[t, c], 1 / np.sqrt(v.var() + 1e-5))
            want = (v - v.mean()) / np.sqrt(v.var() + 1e-5) * w[t, c] + b[t, c]
            np.testing.assert_allclose(y[t, :, c, :], want, rtol=1e-12)
    # The backward against a finite difference of <gy, y> in every argument.
    gy = rng.standard_normal(x.shape)
    gx, gw, gb = reference.bn_backward(gy, x, mean, inv_std, w)
    u = rng.standard_normal(x.shape)

    def f(x_):
        return np.sum(gy * reference.bn_forward(x_, w, b, 1e-5)[0])

    numeric = (f(x + 1e-6 * u) - f(x - 1e-6 * u)) / 2e-6
    np.testing.assert_allclose(np.sum(gx * u), numeric, rtol=1e-6)
    xhat = (x - mean[:, None, :, None]) * inv_std[:, None, :, None]
    np.testing.assert_allclose(gw, (gy * xhat).sum(axis=(1, 3)), rtol=1e-12)
    np.testing.assert_allclose(gb, gy.sum(axis=(1, 3)), rtol=1e-12)


@given(case=bn_arrays(n_arrays=3), per_task=st.booleans(), which=st.sampled_from(range(6)))
def test_bn_double_backward_numba_matches_reference(case, per_task, which):
    (x, gy, ggx), dtype, rng = case
    t, _, c, _ = x.shape
    w, ggw = _params(rng, t, c, dtype, per_task)
    ggb = rng.standard_normal(c).astype(dtype)
    # Every input that may be missing, and the outputs that may be skipped.
    ggx = None if which % 2 else ggx
    need_gy, need_x = [(True, True), (False, True), (True, False)][which // 2]
    mean, inv_std = reference.bn_stats(x, 1e-5)
    args = (gy, x, mean, inv_std, np.broadcast_to(w, (t, c)), ggx)
    params = (np.broadcast_to(ggw, (t, c)), np.broadcast_to(ggb, (t, c)))
    got = numba_impl.bn_double_backward(*args, *params, need_gy=need_gy, need_x=need_x)
    want = reference.bn_double_backward(*args, *params, need_gy=need_gy, need_x=need_x)
    assert (got[0] is None) == (not need_gy) and (got[1] is None) == (not need_x)
    # Sums of O(n) terms times inv_std**2: compare against the size of the results.
    scale = max(float(np.abs(r).max()) for r in want if r is not None) + 1.0
    for g, r in zip(got, want):
        if r is not None:
            assert g.dtype == np.dtype(dtype) and g.shape == r.shape
            np.testing.assert_allclose(
                g, r, rtol=TOL[dtype]["rtol"], atol=10 * TOL[dtype]["atol"] * scale
            )


def test_bn_double_backward_reference_is_the_derivative_of_bn_backward():
    # d/d(gy, x, w) of <ggx, gx> + <ggw, gw> + <ggb, gb>, by central differences along random
    # directions; the statistics are recomputed from the shifted x.
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 4, 3, 5)) * 1.5 + 0.5
    gy, ggx = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    w, ggw, ggb = (rng.standard_normal((2, 3)) for _ in range(3))

    def objective(gy_, x_, w_):
        gx, gw, gb = reference.bn_backward(gy_, x_, *reference.bn_stats(x_, 1e-5), w_)
        return np.sum(ggx * gx) + np.sum(ggw * gw) + np.sum(ggb * gb)

    mean, inv_std = reference.bn_stats(x, 1e-5)
    for ggx_ in (ggx, None):
        if ggx_ is None:  # without ggx: only the gw and gb terms
            ggx = np.zeros(x.shape)
        analytic = kernels.bn_double_backward(gy, x, mean, inv_std, w, ggx_, ggw, ggb)
        for i, g in enumerate(analytic):
            u = rng.standard_normal(g.shape)
            plus, minus = [gy, x, w], [gy, x, w]
            plus[i], minus[i] = plus[i] + 1e-6 * u, minus[i] - 1e-6 * u
            numeric = (objective(*plus) - objective(*minus)) / 2e-6
            np.testing.assert_allclose(np.sum(g * u), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_kernels_keep_large_offsets_accurate(dtype):
    # A mean far from zero relative to the spread: two passes (and float64 sums) keep the
    # variance right where E[x^2] - E[x]^2 would cancel.
    rng = np.random.default_rng(1)
    x = (1000 + rng.standard_normal((1, 400, 2, 49))).astype(dtype)
    _, inv_std = numba_impl.bn_stats(x, 0.0)
    np.testing.assert_allclose(inv_std, 1 / x.astype(np.float64).std(axis=(1, 3)), rtol=1e-3)


# --- max-pool with arg-max ----------------------------------------------------------------


@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    h, w = draw(st.integers(kh, kh + 5)), draw(st.integers(kw, kw + 5))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    # Few distinct values: ties are common, and both must send them to the first offset.
    x = rng.integers(-3, 4, (n, c, h, w)).astype(dtype)
    return _in_layout(x, layout, channel_axis=1), (kh, kw, sh, sw), dtype


@given(case=pool_cases())
def test_maxpool2d_argmax_numba_matches_reference(case):
    x, window, dtype = case
    y, argmax = numba_impl.maxpool2d_argmax(x, *window)
    y_ref, argmax_ref = reference.maxpool2d_argmax(x, *window)
    assert y.dtype == np.dtype(dtype) and argmax.dtype == np.int8
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(argmax, argmax_ref)


def test_maxpool2d_argmax_reference_matches_a_loop():
    rng = np.random.default_rng(2)
    x = rng.integers(-2, 3, (2, 3, 7, 6)).astype(np.float64)
    kh, kw, sh, sw = 3, 2, 2, 1
    y, argmax = kernels.maxpool2d_argmax(x, kh, kw, sh, sw)
    for n, c, i, j in np.ndindex(*y.shape):
        window = x[n, c, i * sh : i * sh + kh, j * sw : j * sw + kw].reshape(-1)
        assert y[n, c, i, j] == window.max()
        assert argmax[n, c, i, j] == np.argmax(window)  # NumPy's argmax: the first maximum


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hw", [(4, 6), (5, 7)])  # the odd sizes leave a row and a column out
def test_maxpool2d_2x2_fast_paths_match_reference(dtype, layout, hw):
    rng = np.random.default_rng(hw[1])
    x = _in_layout(rng.integers(-2, 3, (2, 3) + hw).astype(dtype), layout, channel_axis=1)
    y, argmax = numba_impl.maxpool2d_argmax(x, 2, 2, 2, 2)
    y_ref, argmax_ref = reference.maxpool2d_argmax(x, 2, 2, 2, 2)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(argmax, argmax_ref)
    gy = _in_layout(rng.standard_normal(y.shape).astype(dtype), layout, channel_axis=1)
    gx = numba_impl.maxpool2d_scatter(gy, argmax, 2, 2, 2, 2, *hw)
    assert gx.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(gx, reference.maxpool2d_scatter(gy, argmax, 2, 2, 2, 2, *hw))
    np.testing.assert_array_equal(
        numba_impl.maxpool2d_gather(x, argmax, 2, 2, 2, 2),
        reference.maxpool2d_gather(x, argmax, 2, 2, 2, 2),
    )


@given(case=pool_cases())
def test_maxpool2d_scatter_and_gather_numba_match_reference(case):
    x, window, dtype = case
    h, w = x.shape[2:]
    _, argmax = reference.maxpool2d_argmax(x, *window)
    rng = np.random.default_rng(int(x.size))
    gy = rng.standard_normal(argmax.shape).astype(dtype)
    gx = numba_impl.maxpool2d_scatter(gy, argmax, *window, h, w)
    assert gx.dtype == np.dtype(dtype) and gx.shape == x.shape
    # Overlapping windows add in another order: equal up to rounding.
    _close(gx, reference.maxpool2d_scatter(gy, argmax, *window, h, w), dtype)
    y = numba_impl.maxpool2d_gather(x, argmax, *window)
    np.testing.assert_array_equal(y, reference.maxpool2d_gather(x, argmax, *window))


def test_maxpool2d_scatter_and_gather_references_match_loops_and_are_adjoint():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 7, 6))
    kh, kw, sh, sw = 3, 2, 2, 1  # overlapping windows
    y, argmax = kernels.maxpool2d_argmax(x, kh, kw, sh, sw)
    gy = rng.standard_normal(y.shape)
    gx = np.zeros_like(x)
    for n, c, i, j in np.ndindex(*y.shape):
        p, q = divmod(int(argmax[n, c, i, j]), kw)
        gx[n, c, i * sh + p, j * sw + q] += gy[n, c, i, j]
    np.testing.assert_allclose(reference.maxpool2d_scatter(gy, argmax, kh, kw, sh, sw, 7, 6), gx)
    np.testing.assert_array_equal(reference.maxpool2d_gather(x, argmax, kh, kw, sh, sw), y)
    # <scatter(gy), x> = <gy, gather(x)>: each is the other's gradient.
    scattered = kernels.maxpool2d_scatter(gy, argmax, kh, kw, sh, sw, 7, 6)
    gathered = kernels.maxpool2d_gather(x, argmax, kh, kw, sh, sw)
    np.testing.assert_allclose(np.sum(scattered * x), np.sum(gy * gathered))


# --- convolution windows ----------------------------------------------------------------------


@st.composite
def conv_window_cases(draw):
    """x (N, C, H, W) in a drawn dtype and layout, a window, stride (up to 2) and padding."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    h = draw(st.integers(max(1, kh - 2 * ph), 6))
    w = draw(st.integers(max(1, kw - 2 * pw), 6))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = _in_layout(rng.standard_normal((n, c, h, w)).astype(dtype), layout, channel_axis=1)
    return x, (kh, kw, sh, sw, ph, pw), dtype, rng


def _im2col_loops(x, kh, kw, sh, sw, ph, pw):
    n, c, h, w = x.shape
    padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), x.dtype)
    padded[:, :, ph : ph + h, pw : pw + w] = x
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    cols = np.empty((n, oh, ow, kh, kw, c), x.dtype)
    for i, j, p, q in np.ndindex(oh, ow, kh, kw):
        cols[:, i, j, p, q, :] = padded[:, :, i * sh + p, j * sw + q]
    return cols


@given(case=conv_window_cases())
def test_im2col_matches_loops_and_col2im_is_its_adjoint(case):
    x, window, dtype, rng = case
    cols = kernels.im2col(x, *window)
    assert cols.dtype == np.dtype(dtype) and cols.flags.c_contiguous
    np.testing.assert_array_equal(cols, _im2col_loops(x, *window))
    # <im2col(x), v> = <x, col2im(v)> for any v: col2im is im2col's transpose.
    v = rng.standard_normal(cols.shape).astype(dtype)
    kh, kw, sh, sw, ph, pw = window
    terms = cols.astype(np.float64) * v
    for impl in (reference, numba_impl):
        gx = impl.col2im(v, *x.shape[2:], sh, sw, ph, pw)
        assert gx.shape == x.shape and gx.dtype == np.dtype(dtype)
        # gx is rounded to float32: the error scales with the terms, not with their sum (which
        # can cancel to a small number), hence the atol.
        np.testing.assert_allclose(
            np.sum(terms), np.sum(x.astype(np.float64) * gx), rtol=1e-5,
            atol=1e-5 * np.sum(np.abs(terms)),
        )  # fmt: skip


@given(case=conv_window_cases())
def test_col2im_numba_matches_reference(case):
    x, (kh, kw, sh, sw, ph, pw), dtype, rng = case
    cols = kernels.im2col(x, kh, kw, sh, sw, ph, pw)
    v = rng.standard_normal(cols.shape).astype(dtype)
    v = _in_layout(v, "strided", channel_axis=5) if x.shape[0] > 1 else v  # any strides
    args = (*x.shape[2:], sh, sw, ph, pw)
    _close(numba_impl.col2im(v, *args), reference.col2im(v, *args), dtype)
    # The channel loop itself (col2im hands one channel to the reference).
    gx = np.empty((x.shape[0],) + x.shape[2:] + (x.shape[1],), dtype)
    numba_impl._col2im_channels_last(np.ascontiguousarray(v), sh, sw, ph, pw, gx)
    _close(gx.transpose(0, 3, 1, 2), reference.col2im(v, *args), dtype)


# --- softmax cross-entropy --------------------------------------------------------------------


@given(
    n=st.integers(1, 6),
    c=st.integers(1, 7),
    dtype=st.sampled_from(DTYPES),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_softmax_xent_numba_matches_reference(n, c, dtype, strided, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, c)) * 5).astype(dtype)
    if strided:
        logits = _in_layout(logits, "strided", channel_axis=1)
    labels = rng.integers(0, c, n)
    loss, probs = numba_impl.softmax_xent_forward(logits, labels)
    loss_ref, probs_ref = reference.softmax_xent_forward(logits, labels)
    _close(loss, loss_ref, dtype)
    _close(probs, probs_ref, dtype)
    gloss = rng.standard_normal(n).astype(dtype)
    _close(
        numba_impl.softmax_xent_backward(probs, labels, gloss),
        reference.softmax_xent_backward(probs_ref, labels, gloss),
        dtype,
    )


def test_softmax_xent_reference_matches_the_definition_and_is_stable():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]])
    labels = np.array([2, 1])
    loss, probs = kernels.softmax_xent_forward(logits, labels)
    np.testing.assert_allclose(loss[0], np.log(np.exp(logits[0]).sum()) - 3.0)
    np.testing.assert_allclose(loss[1], 1000.0)  # no overflow for large logits
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    g = kernels.softmax_xent_backward(probs, labels, np.array([1.0, 2.0]))
    np.testing.assert_allclose(g[0], probs[0] - np.eye(3)[2])
    np.testing.assert_allclose(g[1], 2.0 * (probs[1] - np.eye(3)[1]))


# --- elementwise steps: ReLU backward, SGD update -----------------------------------------------


class _loops_for_any_size:
    """Within this context the Numba loops also run on small arrays (they normally hand
    arrays under ``numba_impl._SMALL`` elements to the reference), so that Hypothesis' small
    shapes exercise them."""

    def __enter__(self):
        self.saved = numba_impl._SMALL, numba_impl._ADAM_SMALL
        numba_impl._SMALL = numba_impl._ADAM_SMALL = 0

    def __exit__(self, *exc):
        numba_impl._SMALL, numba_impl._ADAM_SMALL = self.saved
        return False


@st.composite
def same_layout_arrays(draw, n: int = 2, special_values: bool = True):
    """``n`` arrays of one shape, dtype and layout (contiguous, channels-last or strided), then
    the dtype; with zeros, NaN and infinities among the values if ``special_values``."""
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    special = np.array([0.0, -0.0, np.nan, np.inf, -np.inf])
    arrays = []
    for _ in range(n):
        a = rng.standard_normal(shape)
        if special_values:
            a.flat[rng.integers(0, a.size, a.size // 4)] = rng.choice(special, a.size // 4)
        arrays.append(_in_layout(a.astype(dtype), layout, channel_axis=len(shape) - 1))
    return (*arrays, dtype)


@given(case=same_layout_arrays(n=1))
def test_relu_forward_numba_matches_reference_bit_for_bit(case):
    x, dtype = case
    with _loops_for_any_size():
        y = numba_impl.relu_forward(x)
    expected = reference.relu_forward(x)
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    np.testing.assert_array_equal(y, expected)  # NaN where the reference has NaN
    assert (np.signbit(y) == np.signbit(expected)).all()  # -0.0 becomes +0.0 in both
    # The reference is the definition: x where x > 0 or NaN, +0 elsewhere.
    np.testing.assert_array_equal(expected, np.where((x > 0) | np.isnan(x), x, 0))
    assert not np.signbit(expected[~np.isnan(expected)]).any()


def test_relu_forward_keeps_channels_last_memory_and_other_dtypes():
    x = np.random.default_rng(0).standard_normal((2, 5, 6, 7)).astype(np.float32)
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # NHWC memory
    with _loops_for_any_size():
        y = numba_impl.relu_forward(x)
    assert y.strides == x.strides
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    ints = np.array([-2, 0, 3])
    np.testing.assert_array_equal(kernels.relu_forward(ints), [0, 0, 3])


@given(case=same_layout_arrays())
def test_relu_backward_numba_matches_reference_bit_for_bit(case):
    gy, x, dtype = case
    with _loops_for_any_size():
        gx = numba_impl.relu_backward(gy, x)
    expected = reference.relu_backward(gy, x)
    assert gx.dtype == np.dtype(dtype) and gx.shape == x.shape
    np.testing.assert_array_equal(gx, expected)  # NaN where the reference has NaN
    assert (np.signbit(gx) == np.signbit(expected)).all()
    # The reference is the definition: gy where x > 0, gy * 0 elsewhere.
    np.testing.assert_array_equal(expected, np.where(x > 0, gy, gy * 0))


@given(case=same_layout_arrays(), lr=st.floats(1e-4, 10.0))
def test_sgd_update_numba_matches_reference_bit_for_bit(case, lr):
    param, grad, dtype = case
    start = param.copy()
    with _loops_for_any_size():
        out = numba_impl.sgd_update_(param, grad, lr)
    assert out is param and param.dtype == np.dtype(dtype)  # updated in place
    expected = start.copy()
    expected -= lr * grad  # NumPy's own in-place update, with a Python float lr
    np.testing.assert_array_equal(param, expected)
    np.testing.assert_array_equal(reference.sgd_update_(start, grad, lr), expected)


def _adam_scalars(lr, betas, eps, weight_decay, decoupled, step):
    """kernels.adam_update_'s scalars as tinymeta.optim.Adam forms them at step ``step``."""
    beta1, beta2 = betas
    return dict(
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        step_size=-lr / (1 - beta1**step),
        bias_correction2_sqrt=math.sqrt(1 - beta2**step),
        weight_decay=0.0 if decoupled else weight_decay,
        param_decay=1 - lr * weight_decay if decoupled else 1.0,
    )


@given(
    case=same_layout_arrays(5),
    amsgrad=st.booleans(),
    decoupled=st.booleans(),
    lr=st.floats(1e-4, 1.0),
    betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
    eps=st.floats(1e-10, 1e-2),
    weight_decay=st.sampled_from([0.0, 0.1]),
    step=st.integers(1, 50),
)
def test_adam_update_numba_matches_reference_bit_for_bit(
    case, amsgrad, decoupled, lr, betas, eps, weight_decay, step
):
    *arrays, dtype = case
    for second_moment in arrays[3:]:
        np.abs(second_moment, out=second_moment)  # NaN stays NaN; the layout stays
    if not amsgrad:
        arrays[4] = None
    expected = [None if a is None else a.copy(order="K") for a in arrays]
    scalars = _adam_scalars(lr, betas, eps, weight_decay, decoupled, step)
    with _loops_for_any_size(), np.errstate(all="ignore"):
        out = numba_impl.adam_update_(*arrays, **scalars)
        reference.adam_update_(*expected, **scalars)
    assert out is arrays[0] and out.dtype == np.dtype(dtype)  # updated in place
    for name, got, want in zip(("param", "grad", "m", "v", "v_max"), arrays, expected):
        if got is None:
            continue
        np.testing.assert_array_equal(got, want, err_msg=name)  # NaN where the reference has
        numbers = ~np.isnan(want)
        assert (np.signbit(got[numbers]) == np.signbit(want[numbers])).all(), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_update_divides_by_zero_as_numpy_does(dtype):
    """eps = 0 and a second moment of 0: 0 / 0 is NaN and m / 0 is infinite in both, where a
    compiled division with Python's rules would raise ZeroDivisionError."""
    tiny = 1e-30 if dtype == np.float32 else 1e-200  # tiny * tiny underflows to 0
    scalars = _adam_scalars(0.1, (0.9, 0.999), 0.0, 0.0, decoupled=False, step=1)
    results = []
    for update in (numba_impl.adam_update_, reference.adam_update_):
        param, grad = np.ones(2, dtype), np.array([0.0, tiny], dtype)
        moments = [np.zeros(2, dtype) for _ in range(2)]
        with _loops_for_any_size(), np.errstate(all="ignore"):
            results.append(update(param, grad, *moments, None, **scalars))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], [np.nan, -np.inf])


def test_adam_update_reference_is_the_formula():
    """The reference against the formula written once more by hand, in float64 (where the
    rounding order matters little), with weight decay and amsgrad."""
    rng = np.random.default_rng(7)
    param, grad, m, v = rng.standard_normal((4, 3, 5))
    v, v_max = v**2, v**2 + 0.5
    lr, b1, b2, eps, wd, t = 0.1, 0.8, 0.95, 1e-6, 0.05, 3
    g = grad + wd * param
    m_new, v_new = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
    v_hat = np.maximum(v_max, v_new) / (1 - b2**t)
    want = param - lr * m_new / (1 - b1**t) / (np.sqrt(v_hat) + eps)
    arrays = [a.copy() for a in (param, grad, m, v, v_max)]
    scalars = _adam_scalars(lr, (b1, b2), eps, wd, decoupled=False, step=t)
    reference.adam_update_(*arrays, **scalars)
    np.testing.assert_allclose(arrays[0], want, rtol=1e-12)
    np.testing.assert_allclose(arrays[2], m_new, rtol=1e-14)
    np.testing.assert_allclose(arrays[4], np.maximum(v_max, v_new), rtol=1e-14)
    np.testing.assert_array_equal(arrays[1], grad)  # the gradient left alone


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_kernels_on_big_arrays_and_in_channels_last_layout(dtype):
    """Above the small-array cut-off, without the test hook: the compiled loops themselves,
    and an output laid out like gy (a channels-last gradient stays channels-last)."""
    rng = np.random.default_rng(5)
    shape = (4, 16, 9, 9)  # 5184 elements, above numba_impl._SMALL
    assert np.prod(shape) >= numba_impl._SMALL
    gy = _in_layout(rng.standard_normal(shape).astype(dtype), "channels_last", channel_axis=1)
    x = _in_layout(rng.standard_normal(shape).astype(dtype), "channels_last", channel_axis=1)
    gx = numba_impl.relu_backward(gy, x)
    np.testing.assert_array_equal(gx, gy * (x > 0))
    assert gx.strides == gy.strides
    param = x.copy(order="K")
    numba_impl.sgd_update_(param, gy, 0.3)
    np.testing.assert_array_equal(param, x - dtype(0.3) * gy)
    moments = [np.abs(a) for a in (gy, x, x)]  # exp_avg, exp_avg_sq, max_exp_avg_sq
    params = [x.copy(order="K") for _ in range(2)]
    scalars = _adam_scalars(0.1, (0.9, 0.999), 1e-8, 0.1, decoupled=True, step=2)
    want = reference.adam_update_(params[0], gy, *[m.copy() for m in moments], **scalars)
    numba_impl.adam_update_(params[1], gy, *moments, **scalars)
    np.testing.assert_array_equal(params[1], want)
    assert params[1].strides == x.strides


def test_elementwise_kernels_take_the_reference_for_other_dtypes_and_mixed_layouts():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((70, 70))  # float64, 4900 elements
    for gy in (
        x.astype(np.float16),  # no loop compiled for float16
        x.astype(np.float32),  # mixed dtypes
        np.asfortranarray(x),  # a layout unlike x's
        np.broadcast_to(x[:1], x.shape),  # not dense
    ):
        np.testing.assert_array_equal(numba_impl.relu_backward(gy, x), gy * (x > 0))
    param = x.astype(np.float16)
    expected = param.copy()
    expected -= 0.5 * x  # a float64 step, rounded to float16 in place
    np.testing.assert_array_equal(numba_impl.sgd_update_(param, x, 0.5), expected)
    scalars = _adam_scalars(0.1, (0.9, 0.999), 1e-3, 0.1, decoupled=False, step=1)
    for param, grad in ((x.astype(np.float16), x), (x.copy(), x.astype(np.float32))):
        moments = [np.zeros_like(param) for _ in range(3)]
        want = reference.adam_update_(param.copy(), grad, *[m.copy() for m in moments], **scalars)
        got = numba_impl.adam_update_(param, grad, *moments, **scalars)
        np.testing.assert_array_equal(got, want)  # float16, or a float32 gradient: NumPy's rounding


def test_adam_update_runs_the_compiled_loop_on_small_parameters(monkeypatch):
    """No small-array cut-off for Adam: a one-element float32 parameter takes the loop."""

    def no_reference(*args):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(reference, "adam_update_", no_reference)
    param, grad = np.ones(1, np.float32), np.full(1, 0.5, np.float32)
    moments = [np.zeros(1, np.float32) for _ in range(3)]
    scalars = _adam_scalars(0.1, (0.9, 0.999), 1e-8, 0.0, decoupled=False, step=1)
    numba_impl.adam_update_(param, grad, *moments, **scalars)
    np.testing.assert_allclose(param, [0.9], rtol=1e-6)  # the first step moves by lr


@given(
    x=tms.arrays(tms.shapes(max_dims=2, max_side=4), elements=st.floats(0.1, 3.0)),
    signs=st.integers(0, 2**16),
)
def test_relu_grad_is_exact_to_third_order(x, signs):
    """ReluGrad (the ReLU's backward op) against finite differences at orders 1, 2 and 3,
    away from the kink at 0 (where the derivative is taken as 0)."""
    x = x * np.where(np.random.default_rng(signs).random(x.shape) < 0.5, -1.0, 1.0)

    def cubic_through_relu(t):
        r = tm.relu(t)
        return r * r * r + 2.0 * r  # curved, so the derivatives of every order are not 0

    assert check_grads(cubic_through_relu, [tm.tensor(x)], order=3)


def test_relu_backward_is_one_relu_grad_node_in_a_recorded_graph():
    x = tm.tensor(np.array([-1.0, 0.5, 2.0]), requires_grad=True)
    (g,) = tm.grad((tm.relu(x) ** 2).sum(), x, create_graph=True)
    np.testing.assert_array_equal(g.numpy(), [0.0, 1.0, 4.0])
    assert type(g.grad_fn).__name__ == "ReluGrad"
    (gg,) = tm.grad(g.sum(), x)  # d/dx sum(2 relu(x) [x > 0]) = 2 [x > 0]
    np.testing.assert_array_equal(gg.numpy(), [0.0, 2.0, 2.0])


# --- start-up: Numba is loaded by the first kernel call, from its cache ---------------------------


def test_numba_is_imported_by_the_first_kernel_call_not_by_import():
    code = (
        "import sys, numpy as np, tinymeta, tinymeta.nn, tinymeta.optim\n"
        "from tinymeta import kernels\n"
        "before = 'numba' in sys.modules\n"
        "kernels.softmax_xent_forward(np.zeros((2, 3)), np.zeros(2, np.int64))\n"
        "print(before, 'numba' in sys.modules, kernels.backend())\n"
    )
    env = dict(os.environ, TINYMETA_KERNELS="numba")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "True", "numba"]


def test_every_numba_kernel_is_cached_on_disk():
    import numba.core.caching

    dispatchers = [
        f for f in vars(numba_impl).values() if isinstance(f, numba.core.dispatcher.Dispatcher)
    ]
    assert len(dispatchers) >= 14
    for f in dispatchers:
        assert isinstance(f._cache, numba.core.caching.FunctionCache), f.__name__


# --- backend selection and errors --------------------------------------------------------------


def test_set_backend_switches_and_reports():
    previous = kernels.set_backend("numpy")
    try:
        assert kernels.backend() == "numpy"
        x = np.random.default_rng(3).standard_normal((1, 4, 2, 3))
        y = kernels.bn_forward(x, np.ones(2), np.zeros(2), 1e-5)[0]
        kernels.set_backend("numba")
        assert kernels.backend() == "numba"
        np.testing.assert_allclose(kernels.bn_forward(x, np.ones(2), np.zeros(2), 1e-5)[0], y)
        with pytest.raises(ValueError, match="TINYMETA_KERNELS must be one of"):
            kernels.set_backend("fortran")
    finally:
        kernels.set_backend(previous)


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_environment_variable_picks_the_backend(name):
    env = dict(os.environ, TINYMETA_KERNELS=name)
    out = subprocess.run(
        [sys.executable, "-c", "import tinymeta.kernels as k; print(k.backend())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == name


def test_kernel_argument_errors_name_the_kernel_and_shapes():
    x = np.zeros((1, 2, 3, 4))
    with pytest.raises(TypeError, match=r"bn_forward: expected float32 or float64 .* x int64"):
        kernels.bn_forward(x.astype(np.int64), np.ones(3), np.zeros(3), 1e-5)
    with pytest.raises(ValueError, match=r"bn_forward: weight must have shape \(3,\) or \(1, 3\)"):
        kernels.bn_forward(x, np.ones(4), np.zeros(3), 1e-5)
    with pytest.raises(ValueError, match=r"bn_stats: expected a non-empty \(T, N, C, S\)"):
        kernels.bn_stats(np.zeros((2, 3)), 1e-5)
    with pytest.raises(TypeError, match="bn_backward: .* gy float32, x float64"):
        kernels.bn_backward(x.astype(np.float32), x, np.zeros((1, 3)), np.ones((1, 3)), np.ones(3))
    with pytest.raises(ValueError, match=r"bn_double_backward: ggx has shape \(1, 2, 3, 5\)"):
        kernels.bn_double_backward(
            x, x, np.zeros((1, 3)), np.ones((1, 3)), ggx=np.zeros((1, 2, 3, 5))
        )
    with pytest.raises(ValueError, match=r"bn_double_backward: ggw must have shape \(3,\) or"):
        kernels.bn_double_backward(x, x, np.zeros((1, 3)), np.ones((1, 3)), ggw=np.ones(2))
    with pytest.raises(ValueError, match=r"bn_double_backward: inv_std must have shape \(1, 3\)"):
        kernels.bn_double_backward(x, x, np.zeros((1, 3)), np.ones(3))
    # float32 statistics with float64 data: the reference would promote, the kernels would not.
    with pytest.raises(TypeError, match=r"bn_backward: mean must have x's dtype float64, got fl"):
        kernels.bn_backward(x, x, np.zeros((1, 3), np.float32), np.ones((1, 3)), np.ones(3))
    with pytest.raises(TypeError, match=r"bn_double_backward: inv_std must have x's dtype"):
        kernels.bn_double_backward(x, x, np.zeros((1, 3)), np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match=r"maxpool2d_argmax: .* window \(5, 1\)"):
        kernels.maxpool2d_argmax(np.zeros((1, 1, 4, 4)), 5, 1, 1, 1)
    y, argmax = kernels.maxpool2d_argmax(np.zeros((1, 2, 4, 4)), 2, 2, 2, 2)
    with pytest.raises(ValueError, match=r"maxpool2d_scatter: .* \(4, 4\) input gives \(2, 2\)"):
        kernels.maxpool2d_scatter(np.zeros((1, 2, 3, 2)), argmax, 2, 2, 2, 2, 4, 4)
    with pytest.raises(ValueError, match=r"maxpool2d_gather: expected an int8 or int32 arg-max"):
        kernels.maxpool2d_gather(np.zeros((1, 2, 4, 4)), argmax.astype(np.int64), 2, 2, 2, 2)
    with pytest.raises(TypeError, match="maxpool2d_gather: expected float32 or float64"):
        kernels.maxpool2d_gather(np.zeros((1, 2, 4, 4), np.int32), argmax, 2, 2, 2, 2)
    with pytest.raises(ValueError, match=r"im2col: expected an \(N, C, H, W\) array"):
        kernels.im2col(np.zeros((2, 3, 4)), 3, 3, 1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"im2col: .* window \(5, 3\) .* padded \(2, 4\)"):
        kernels.im2col(np.zeros((1, 1, 2, 4)), 5, 3, 1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"col2im: .* has \(4, 4\) positions, but cols"):
        kernels.col2im(np.zeros((1, 3, 4, 3, 3, 2)), 4, 4, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="softmax_xent_forward: expected 2 integer labels"):
        kernels.softmax_xent_forward(np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match=r"relu_backward: .* gy \(2, 3\) and x \(3, 2\)"):
        kernels.relu_backward(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"sgd_update_: .* param \(4,\) and grad \(1, 4\)"):
        kernels.sgd_update_(np.zeros(4), np.zeros((1, 4)), 0.1)
    adam_scalars = _adam_scalars(0.1, (0.9, 0.999), 1e-8, 0.0, decoupled=False, step=1)
    with pytest.raises(ValueError, match=r"adam_update_: .* param \(4,\) and exp_avg \(3,\)"):
        kernels.adam_update_(np.zeros(4), np.zeros(4), np.zeros(3), np.zeros(4), **adam_scalars)
    with pytest.raises(ValueError, match=r"adam_update_: .* and max_exp_avg_sq \(2, 2\)"):
        kernels.adam_update_(*[np.zeros(4)] * 4, np.zeros((2, 2)), **adam_scalars)
