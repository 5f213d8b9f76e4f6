"""F.erf (a new op: its derivative 2/sqrt(pi) exp(-x^2), checked to third order), GELU (exact
and tanh forms), Tanh, Sigmoid and Dropout (seeded masks, off in eval)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta import nn
from tinymeta.testing import check_grads
from tinymeta.testing import strategies as tms


@given(x=tms.arrays(tms.shapes(max_dims=2, max_side=4), elements=st.floats(-3.0, 3.0)))
def test_erf_values_and_derivatives_to_third_order(x):
    want = np.vectorize(math.erf)(x) if x.size else x
    np.testing.assert_allclose(F.erf(tm.tensor(x)).numpy(), want, atol=1e-15)
    assert check_grads(F.erf, [x], order=3)


def test_erf_closed_form_derivatives():
    x = tm.tensor(np.array([-1.0, 0.0, 0.5]), requires_grad=True)
    (g,) = tm.grad(F.erf(x).sum(), x, create_graph=True)
    np.testing.assert_allclose(g.numpy(), 2 / np.sqrt(np.pi) * np.exp(-(x.numpy() ** 2)))
    (gg,) = tm.grad(g.sum(), x)
    np.testing.assert_allclose(gg.numpy(), -2 * x.numpy() * g.numpy())


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_the_definition_and_has_second_derivatives(approximate):
    x = np.linspace(-4, 4, 17)
    if approximate == "none":
        want = x * 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    else:
        want = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    got = nn.GELU(approximate)(tm.tensor(x))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-14)
    assert check_grads(lambda t: F.gelu(t, approximate), [x], order=2)
    assert (
        got.dtype == np.float64 and nn.GELU()(tm.tensor(x.astype(np.float32))).dtype == np.float32
    )


def test_tanh_and_sigmoid_modules():
    x = np.linspace(-3, 3, 7)
    np.testing.assert_allclose(nn.Tanh()(tm.tensor(x)).numpy(), np.tanh(x), atol=1e-15)
    np.testing.assert_allclose(nn.Sigmoid()(tm.tensor(x)).numpy(), 1 / (1 + np.exp(-x)), atol=1e-15)
    assert check_grads(lambda t: nn.Sigmoid()(nn.Tanh()(t)), [x], order=2)


def test_dropout_is_seeded_scaled_and_off_in_eval():
    x = tm.ones(4000, dtype="float64")
    a, b = nn.Dropout(0.25, rng=3), nn.Dropout(0.25, rng=3)
    ya, yb = a(x).numpy(), b(x).numpy()
    np.testing.assert_array_equal(ya, yb)  # the same seed, the same masks
    assert set(np.unique(ya)) == {0.0, 1 / 0.75}
    assert abs((ya == 0).mean() - 0.25) < 0.03
    assert not np.array_equal(a(x).numpy(), ya)  # the next call draws a new mask
    tm.manual_seed(5)
    first = nn.Dropout(0.5)(x).numpy()
    tm.manual_seed(5)
    np.testing.assert_array_equal(nn.Dropout(0.5)(x).numpy(), first)  # tm.manual_seed applies
    a.eval()
    assert a(x) is x
    np.testing.assert_array_equal(F.dropout(x, 1.0).numpy(), 0.0)
    assert F.dropout(x, 0.0) is x


def test_dropout_gradient_is_the_scaled_mask_at_every_order():
    x = np.random.default_rng(0).standard_normal(20)

    def fn(t):  # a fresh generator per call: the same mask at every evaluation
        return F.dropout(t, 0.4, rng=np.random.default_rng(1)) ** 2

    assert check_grads(fn, [x], order=2)
    t = tm.tensor(x, requires_grad=True)
    y = F.dropout(t, 0.4, rng=np.random.default_rng(1))
    (g,) = tm.grad(y.sum(), t)
    np.testing.assert_array_equal(g.numpy(), y.numpy() / x)


def test_dropout_and_gelu_errors():
    with pytest.raises(ValueError, match="Dropout: p must be a probability"):
        nn.Dropout(1.5)
    with pytest.raises(ValueError, match="gelu: approximate must be 'none' or 'tanh'"):
        F.gelu(tm.zeros(2), "fast")
    with pytest.raises(TypeError, match="erf: expected a float32 or float64 tensor, got int64"):
        F.erf(tm.tensor(np.arange(3)))
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        nn.Dropout(0.5, rng="seed")
