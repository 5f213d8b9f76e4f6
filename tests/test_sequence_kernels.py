"""The recurrent-cell and erf kernels: Numba against the NumPy reference (float32 and float64,
contiguous and strided inputs, drawn shapes), the references against plain definitions, and
argument errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tinymeta.kernels import reference

from tinymeta import kernels

numba_impl = pytest.importorskip("tinymeta.kernels.numba_impl")

TOL = {np.float32: {"rtol": 1e-5, "atol": 1e-6}, np.float64: {"rtol": 1e-13, "atol": 1e-14}}


def _strided(a):
    """The same values in memory where no axis is contiguous."""
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


@st.composite
def cell_arrays(draw):
    m, h = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    strided = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))

    def arr(width):
        a = (3 * rng.standard_normal((m, width))).astype(dtype)
        return _strided(a) if strided else a

    return m, h, dtype, arr


def _check(name, inputs, dtype):
    """numba_impl.<name> against reference.<name> on the same inputs. In float32 both are
    compared with the reference evaluated in float64, to an absolute tolerance scaled by the
    inputs' magnitude: terms such as 1 - n^2 with n near 1 cancel, so an element can be far
    below the size of its factors, and an elementwise relative bound between two float32
    results would measure rounding, not the kernel."""
    outputs = lambda impl: _as_tuple(getattr(impl, name)(*inputs))  # noqa: E731
    got, want = outputs(numba_impl), outputs(reference)
    for g, w in zip(got, want):
        assert g.dtype == np.dtype(dtype) and g.shape == w.shape
    if dtype == np.float64:
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, **TOL[dtype])
        return
    truth = _as_tuple(getattr(reference, name)(*(a.astype(np.float64) for a in inputs)))
    scale = max(float(np.abs(a).max()) for a in inputs)
    for g, w, t in zip(got, want, truth):
        np.testing.assert_allclose(g, t, rtol=1e-5, atol=2e-6 * scale)
        np.testing.assert_allclose(w, t, rtol=1e-5, atol=2e-6 * scale)


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


@given(case=cell_arrays())
def test_lstm_kernels_match_the_reference(case):
    m, h, dtype, arr = case
    gates, c, gh, gc = arr(4 * h), arr(h), arr(h), arr(h)
    _check("lstm_pointwise_forward", (gates, c), dtype)
    _check("lstm_pointwise_backward", (gates, c, gh, gc), dtype)


@given(case=cell_arrays())
def test_gru_kernels_match_the_reference(case):
    m, h, dtype, arr = case
    gi, gh, hx, gy = arr(3 * h), arr(3 * h), arr(h), arr(h)
    _check("gru_pointwise_forward", (gi, gh, hx), dtype)
    _check("gru_pointwise_backward", (gi, gh, hx, gy), dtype)


def _sig(x):
    return 1 / (1 + np.exp(-x))


def test_references_follow_the_equations():
    rng = np.random.default_rng(0)
    gates, c = rng.standard_normal((3, 8)), rng.standard_normal((3, 2))
    i, f, g, o = np.split(gates, 4, axis=1)
    c_new = _sig(f) * c + _sig(i) * np.tanh(g)
    h_new, c_out = reference.lstm_pointwise_forward(gates, c)
    np.testing.assert_allclose(c_out, c_new, rtol=1e-14)
    np.testing.assert_allclose(h_new, _sig(o) * np.tanh(c_new), rtol=1e-14)
    # The backward is the gradient of <gh, h'> + <gc, c'>: central differences.
    gh, gc = rng.standard_normal((2, 3, 2))
    dgates, dc = reference.lstm_pointwise_backward(gates, c, gh, gc)

    def s(a, cc):
        hh, ccn = reference.lstm_pointwise_forward(a, cc)
        return (gh * hh).sum() + (gc * ccn).sum()

    eps, e = 1e-6, np.zeros_like(gates)
    e[1, 5] = eps
    np.testing.assert_allclose(dgates[1, 5], (s(gates + e, c) - s(gates - e, c)) / (2 * eps), 1e-7)
    e = np.zeros_like(c)
    e[2, 0] = eps
    np.testing.assert_allclose(dc[2, 0], (s(gates, c + e) - s(gates, c - e)) / (2 * eps), 1e-7)
    gi, ghh, hx = rng.standard_normal((3, 6)), rng.standard_normal((3, 6)), c
    r, z = _sig(gi[:, :2] + ghh[:, :2]), _sig(gi[:, 2:4] + ghh[:, 2:4])
    n = np.tanh(gi[:, 4:] + r * ghh[:, 4:])
    np.testing.assert_allclose(
        reference.gru_pointwise_forward(gi, ghh, hx), (1 - z) * n + z * hx, rtol=1e-14
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_erf_kernels_match_math_erf(dtype):
    x = np.linspace(-6, 6, 101).astype(dtype).reshape(1, 101)
    want = np.array([math.erf(v) for v in x.ravel().astype(np.float64)]).reshape(x.shape)
    for impl in (reference, numba_impl):
        got = impl.erf(_strided(x))
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got, want.astype(dtype), rtol=TOL[dtype]["rtol"], atol=1e-7)


def test_kernel_wrappers_check_their_arguments():
    with pytest.raises(ValueError, match=r"lstm_pointwise_forward: expected gate pre-activations"):
        kernels.lstm_pointwise_forward(np.zeros((2, 7)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"gru_pointwise_backward: gy must have shape \(2, 2\)"):
        kernels.gru_pointwise_backward(
            np.zeros((2, 6)), np.zeros((2, 6)), np.zeros((2, 2)), np.zeros(2)
        )
    with pytest.raises(TypeError, match="erf: expected float32 or float64"):
        kernels.erf(np.zeros(3, dtype=np.int64))


@pytest.mark.parametrize("impl", ["reference", "numba"])
def test_lstm_backward_writes_into_out(impl):
    rng = np.random.default_rng(1)
    gates, c, gh, gc = (rng.standard_normal(s) for s in ((3, 8), (3, 2), (3, 2), (3, 2)))
    buffer = np.full((2, 3, 8), np.nan)
    module = reference if impl == "reference" else numba_impl
    dgates, dc = module.lstm_pointwise_backward(gates, c, gh, gc, out=buffer[1])
    assert np.shares_memory(dgates, buffer) and np.isnan(buffer[0]).all()
    want, want_dc = reference.lstm_pointwise_backward(gates, c, gh, gc)
    np.testing.assert_allclose(buffer[1], want, rtol=1e-13)
    np.testing.assert_allclose(dc, want_dc, rtol=1e-13)
    with pytest.raises(ValueError, match="out must be a C-contiguous float64 array of shape"):
        kernels.lstm_pointwise_backward(gates, c, gh, gc, out=np.empty((3, 8), np.float32))
