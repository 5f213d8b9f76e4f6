"""Derivatives at the edges of each op's domain: 0, +-inf, ties, empty axes (issue 11).

Each row gives an op, an input on an edge and the expected value and first, second and third
derivatives (seeded with ones: d1 = d sum(y)/dx, d2 = d sum(d1)/dx, ...). The expected numbers
are PyTorch 2.13's convention, read off torch once and written in (torch is not imported);
rows marked "tinymeta" keep a finite, documented value where PyTorch gives nan (see
docs/autograd-rules.md, "Edge values and dtype promotion"). ``CONST`` says that the previous
derivative no longer depends on x (its derivative is identically 0).
"""

from __future__ import annotations

import numpy as np
import pytest

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta.testing import check_grads

inf, nan = np.inf, np.nan
CONST = "const"


def derivatives(fn, x0, order: int = 3) -> list:
    """[y, d1, d2, d3] of fn at x0 (float64), each d_k = grad of sum(d_{k-1})."""
    x = tm.tensor(np.asarray(x0, dtype=np.float64), requires_grad=True)
    with np.errstate(all="ignore"):  # inf - inf and 0 * inf are the point here
        y = fn(x)
        out, current = [y.numpy()], y.sum()
        for _ in range(order):
            if not current.requires_grad:
                out.append(CONST)
                break
            (g,) = tm.grad(current, x, create_graph=True, allow_unused=True)
            if g is None:  # unused: the derivative is identically 0
                out.append(CONST)
                break
            out.append(g.numpy())
            current = g.sum()
    return out


def assert_derivatives(got: list, expected: list) -> None:
    for k, want in enumerate(expected):
        if want is CONST:
            # identically zero from here on: either the graph says so, or the values are 0
            assert all(g is CONST or not np.any(g) for g in got[k:]), (k, got)
            return
        assert got[k] is not CONST, f"order {k}: expected {want}, got a constant"
        np.testing.assert_allclose(got[k], np.asarray(want, dtype=float), rtol=1e-12, atol=1e-15)


# name, fn, x, [y, d1, d2, d3]
UNARY = [
    # powers with a constant exponent at 0: the polynomial's derivatives, inf where it has a pole
    ("x**2 at 0", lambda x: x**2, [0.0], [[0.0], [0.0], [2.0], CONST]),
    ("x**3 at 0", lambda x: x**3, [0.0], [[0.0], [0.0], [0.0], [6.0]]),
    ("x**0 at 0", lambda x: x**0, [0.0], [[1.0], [0.0], CONST]),
    ("x**1 at 0", lambda x: x**1, [0.0], [[0.0], [1.0], [0.0], CONST]),
    ("x**0.5 at 0", lambda x: x**0.5, [0.0], [[0.0], [inf], [-inf], [inf]]),
    ("x**-1 at 0", lambda x: x**-1, [0.0], [[inf], [-inf], [inf], [-inf]]),
    ("1/x at 0, inf", lambda x: 1.0 / x, [0.0, inf], [[inf, 0], [-inf, 0], [inf, 0], [-inf, 0]]),
    # tinymeta: d(0**x)/dx = 0 at every order (PyTorch: 0 at first order, nan after)
    ("0**x", lambda x: 0.0**x, [1.0, 0.0, 2.0], [[0, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]),
    ("2**x at +-inf", lambda x: 2.0**x, [-inf, inf], [[0, inf]] * 4),
    ("exp at +-inf", tm.exp, [-inf, inf], [[0, inf]] * 4),
    ("log at 0, inf", tm.log, [0.0, inf], [[-inf, inf], [inf, 0], [-inf, 0], [inf, 0]]),
    ("sqrt at 0, inf", tm.sqrt, [0.0, inf], [[0, inf], [inf, 0], [-inf, 0], [inf, 0]]),
    # sign(0) = 0: |x|' = 0 at 0 (PyTorch's convention too)
    ("abs at 0, +-inf", tm.abs, [0.0, -inf, inf], [[0, inf, inf], [0, -1, 1], CONST]),
    # relu'(0) = 0
    ("relu at 0, +-inf", tm.relu, [0.0, -inf, inf], [[0, 0, inf], [0, 0, 1], CONST]),
    ("tanh at +-inf", tm.tanh, [-inf, inf], [[-1, 1], [0, 0], [0, 0], [0, 0]]),
    (
        "sigmoid at +-inf, +-800",
        tm.sigmoid,
        [-inf, inf, -800.0, 800.0],
        [[0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    ),
    ("sin at inf", tm.sin, [inf], [[nan], [nan], [nan], [nan]]),
    # the bounds themselves pass the gradient (PyTorch's clamp does the same)
    (
        "clip at and beyond its bounds",
        lambda x: tm.clip(x, -1.0, 1.0),
        [-1.0, 1.0, -inf, inf],
        [[-1, 1, -1, 1], [1, 1, 0, 0], CONST],
    ),
    # elementwise ties: each side takes half the gradient (PyTorch's maximum/minimum too)
    ("maximum with a tie", lambda x: tm.maximum(x[0], x[1]), [1.0, 1.0], [1.0, [0.5, 0.5], CONST]),
    ("minimum with a tie", lambda x: tm.minimum(x[0], x[1]), [2.0, 2.0], [2.0, [0.5, 0.5], CONST]),
    # the branch not taken may hold inf: its gradient is a 0 from the mask, not 0 * inf
    (
        "where with inf in the branch not taken",
        lambda x: tm.where(np.array([True, False]), x, 0.0),
        [1.0, inf],
        [[1.0, 0.0], [1.0, 0.0], CONST],
    ),
    # ties split the gradient evenly (PyTorch's max()/amax do the same)
    ("max with ties", lambda x: x.max(), [1.0, 3.0, 3.0], [3.0, [0, 0.5, 0.5], CONST]),
    ("max with inf ties", lambda x: x.max(), [inf, 1.0, inf], [inf, [0.5, 0, 0.5], CONST]),
    ("max of all -inf", lambda x: x.max(), [-inf, -inf], [-inf, [0.5, 0.5], CONST]),
    ("min with ties", lambda x: x.min(), [2.0, 2.0], [2.0, [0.5, 0.5], CONST]),
    (
        "max over an axis with ties",
        lambda x: x.max(axis=1),
        [[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]],
        [[3, 2], [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]], CONST],
    ),
    (
        "logsumexp with ties",
        lambda x: tm.logsumexp(x),
        [1.0, 1.0],
        [1 + np.log(2), [0.5, 0.5], [0, 0], [0, 0]],
    ),
    (
        "logsumexp with one -inf",
        lambda x: tm.logsumexp(x),
        [-inf, 0.0],
        [0.0, [0, 1], [0, 0], [0, 0]],
    ),
    # softmax of all -inf is undefined: nan gradients, as in PyTorch
    ("logsumexp of all -inf", lambda x: tm.logsumexp(x), [-inf, -inf], [-inf] + [[nan, nan]] * 3),
    ("logsumexp with +inf", lambda x: tm.logsumexp(x), [inf, 0.0], [inf, [nan, 0], [nan, nan]]),
    ("logsumexp over an empty axis", lambda x: tm.logsumexp(x, axis=0), np.zeros(0), [-inf, []]),
    ("var of a constant", lambda x: tm.var(x), [2.0, 2.0], [0.0, [0, 0], [0, 0], CONST]),
    # n - ddof = 0: nan, as NumPy and PyTorch (before: ZeroDivisionError)
    ("var of one value, ddof=1", lambda x: tm.var(x, ddof=1), [2.0], [nan, [nan]]),
    ("var of nothing", lambda x: tm.var(x), np.zeros((0, 3)), [nan, np.zeros((0, 3)), CONST]),
    # a mean over nothing is nan; its gradient is shaped like the (empty) input
    ("mean of nothing", lambda x: x.mean(), np.zeros((0, 3)), [nan, np.zeros((0, 3)), CONST]),
    (
        "mean over an empty axis",
        lambda x: x.mean(axis=0),
        np.zeros((0, 3)),
        [[nan] * 3, np.zeros((0, 3)), CONST],
    ),
    ("mean of empty rows", lambda x: x.mean(axis=1), np.zeros((0, 3)), [[], np.zeros((0, 3))]),
    ("sum of nothing", lambda x: x.sum(), np.zeros((0, 3)), [0.0, np.zeros((0, 3)), CONST]),
    (
        "softmax with -inf",
        lambda x: F.softmax(x) * tm.tensor([[1.0, 2.0, 3.0]]),
        [[-inf, 0.0, 1.0]],
        None,
    ),
    ("softmax over an empty axis", lambda x: F.softmax(x), np.zeros((2, 0)), [np.zeros((2, 0))]),
    ("log_softmax over an empty axis", F.log_softmax, np.zeros((2, 0)), [np.zeros((2, 0))]),
    ("softmax of empty rows", lambda x: F.softmax(x), np.zeros((0, 3)), [np.zeros((0, 3))]),
    (
        "cross_entropy of an empty batch (mean)",
        lambda x: F.cross_entropy(x, np.zeros(0, np.int64)),
        np.zeros((0, 3)),
        [nan, np.zeros((0, 3))],
    ),
    (
        "cross_entropy of an empty batch (sum)",
        lambda x: F.cross_entropy(x, np.zeros(0, np.int64), reduction="sum"),
        np.zeros((0, 3)),
        [0.0, np.zeros((0, 3))],
    ),
    (
        "nll_loss of an empty batch",
        lambda x: F.nll_loss(x, np.zeros(0, np.int64)),
        np.zeros((0, 3)),
        [nan, np.zeros((0, 3))],
    ),
    (
        "mse_loss of nothing",
        lambda x: F.mse_loss(x, np.zeros(0)),
        np.zeros(0),
        [nan, np.zeros(0)],
    ),
    (
        "cross_entropy with tied logits",
        lambda x: F.cross_entropy(x, np.array([0])),
        [[1.0, 1.0]],
        [np.log(2), [[-0.5, 0.5]], [[0, 0]], [[0, 0]]],
    ),
    (
        "cross_entropy with huge logits",
        lambda x: F.cross_entropy(x, np.array([0])),
        [[1000.0, 0.0, -1000.0]],
        [0.0, [[0, 0, 0]], [[0, 0, 0]], [[0, 0, 0]]],
    ),
    # ties in a pooling window: the first maximal element (row-major) takes the gradient, as
    # PyTorch's max_pool2d; -inf windows likewise
    (
        "max_pool2d with a tied window",
        lambda x: F.max_pool2d(x, 2),
        np.ones((1, 1, 2, 2)),
        [np.ones((1, 1, 1, 1)), [[[[1, 0], [0, 0]]]], CONST],
    ),
    (
        "max_pool2d of -inf",
        lambda x: F.max_pool2d(x, 2),
        np.full((1, 1, 2, 2), -inf),
        [np.full((1, 1, 1, 1), -inf), [[[[1, 0], [0, 0]]]], CONST],
    ),
    (
        "max_pool2d of an empty batch",
        lambda x: F.max_pool2d(x, 2),
        np.zeros((0, 1, 2, 2)),
        [np.zeros((0, 1, 1, 1)), np.zeros((0, 1, 2, 2))],
    ),
    (
        "conv2d of an empty batch",
        lambda x: F.conv2d(x, tm.tensor(np.ones((2, 1, 2, 2)))),
        np.zeros((0, 1, 3, 3)),
        [np.zeros((0, 2, 2, 2)), np.zeros((0, 1, 3, 3))],
    ),
]


@pytest.mark.parametrize(("name", "fn", "x", "expected"), UNARY, ids=[c[0] for c in UNARY])
def test_edge_derivatives(name, fn, x, expected):
    got = derivatives(fn, x)
    if expected is None:  # only finiteness is asserted
        assert all(g is CONST or np.all(np.isfinite(g)) for g in got[1:]), got
        return
    assert_derivatives(got, expected)


def test_softmax_with_minus_inf_is_finite_and_zero_there():
    # exp(-inf) = 0: that entry has probability 0 and receives no gradient, at every order
    got = derivatives(lambda x: F.softmax(x) * tm.tensor([[1.0, 2.0, 3.0]]), [[-inf, 0.0, 1.0]])
    for g in got[1:]:
        assert g is CONST or (np.all(np.isfinite(g)) and g[0, 0] == 0), got


# --- a ** b at a == 0: the two-input case -------------------------------------------------------


def pow_derivatives(a0: float, b0: float):
    """(gradient (2,), Hessian (2, 2) with rows d/da, d/db of the gradient) of a ** b."""
    a = tm.tensor(np.float64(a0), requires_grad=True)
    b = tm.tensor(np.float64(b0), requires_grad=True)
    g = tm.grad(a**b, [a, b], create_graph=True)
    rows = [tm.grad(gi, [a, b], allow_unused=True, retain_graph=True) for gi in g]
    hessian = [[0.0 if h is None else h.item() for h in row] for row in rows]
    return np.array([gi.item() for gi in g]), np.array(hessian)


POW_AT_ZERO = [
    # (a, b), gradient, Hessian. PyTorch: the same gradient (d/db = 0 where a == 0 and b >= 0,
    # d/da = 0 where a == b == 0) and the same d/da row; its d/db row is nan at a == 0, which
    # tinymeta keeps finite (0: the gradient in b is the constant 0 there).
    ((0.0, 2.0), [0.0, 0.0], [[2.0, 0.0], [0.0, 0.0]]),
    ((0.0, 3.0), [0.0, 0.0], [[0.0, 0.0], [0.0, 0.0]]),
    ((0.0, 1.0), [1.0, 0.0], [[0.0, 1.0], [0.0, 0.0]]),
    ((0.0, 0.0), [0.0, 0.0], [[0.0, 0.0], [0.0, 0.0]]),
    # b = 0, a != 0: the true mixed derivative 1 / a on both sides (PyTorch zeroes d2/db da
    # here, giving an asymmetric Hessian)
    ((2.0, 0.0), [0.0, np.log(2.0)], [[0.0, 0.5], [0.5, np.log(2.0) ** 2]]),
]


@pytest.mark.parametrize(("point", "gradient", "hessian"), POW_AT_ZERO)
def test_pow_at_zero_base(point, gradient, hessian):
    g, h = pow_derivatives(*point)
    np.testing.assert_allclose(g, gradient, atol=1e-15)
    np.testing.assert_allclose(h, hessian, atol=1e-15)


def test_pow_gradient_in_exponent_at_zero_base_is_zero_not_nan():
    # the case of issue 11: 0 ** b with b > 0 is 0 for every such b
    a = tm.tensor(np.zeros(3))
    b = tm.tensor(np.array([0.5, 1.0, 2.0]), requires_grad=True)
    (g,) = tm.grad((a**b).sum(), b)
    np.testing.assert_array_equal(g.numpy(), [0.0, 0.0, 0.0])


def test_pow_at_zero_base_third_order_is_finite_and_broadcasts():
    # a (3,) against b (): the masks broadcast and the gradients are summed back to b's shape
    a = tm.tensor(np.array([0.0, 0.0, 2.0]), requires_grad=True)
    b = tm.tensor(np.float64(2.0), requires_grad=True)
    ga, gb = tm.grad((a**b).sum(), [a, b], create_graph=True)
    assert gb.shape == () and ga.shape == (3,)
    np.testing.assert_allclose(gb.item(), 4.0 * np.log(2.0))  # only a = 2 contributes
    (h,) = tm.grad(gb, b, create_graph=True)
    (k,) = tm.grad(h, b)
    np.testing.assert_allclose([h.item(), k.item()], [4.0 * np.log(2) ** 2, 4.0 * np.log(2) ** 3])


@pytest.mark.parametrize(("a", "b"), [(0.7, 0.0), (1.3, 2.0), (2.0, -0.5)])
def test_pow_rule_against_finite_differences(a, b):
    # away from a == 0, where finite differences are defined: first and second order
    check_grads(lambda x, y: x**y, [np.array([a, 1.1]), np.array([b, 0.3])], order=2)


def test_pow_at_zero_base_against_finite_differences():
    # integer exponents: a ** b is defined on both sides of a = 0, so finite differences in a
    # and b are too; they confirm the masked first derivatives (0 in b, b * a ** (b - 1) in a)
    check_grads(lambda x, y: x**y, [np.array([0.0, 0.0, 0.5]), np.array([2.0, 3.0, 2.0])], order=1)


def test_linear_with_no_input_features():
    # (N, 0) @ (0, out)^T = zeros; before, the weight gradient failed reshaping an empty array
    x = tm.tensor(np.zeros((2, 0)), requires_grad=True)
    w = tm.tensor(np.zeros((3, 0)), requires_grad=True)
    b = tm.tensor(np.arange(3.0), requires_grad=True)
    y = F.linear(x, w, b)
    np.testing.assert_array_equal(y.numpy(), [[0, 1, 2], [0, 1, 2]])
    gx, gw, gb = tm.grad(y.sum(), [x, w, b])
    assert gx.shape == (2, 0) and gw.shape == (3, 0)
    np.testing.assert_array_equal(gb.numpy(), [2.0, 2.0, 2.0])


def test_gradcheck_fails_on_a_nan_gradient():
    # a nan analytic gradient used to pass the directional check (nan > tol is False)
    from tinymeta.function import Function

    class NanGrad(Function):
        def forward(self, x):
            return x * 1.0

        def backward(self, gy):
            return gy * float("nan")

    with pytest.raises(AssertionError):
        check_grads(lambda x: NanGrad.apply(x), [np.array([1.0, 2.0])], order=1)
