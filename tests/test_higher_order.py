"""Higher-order derivatives against closed forms and finite differences."""

from __future__ import annotations

import numpy as np
import pytest

import tinymeta as tm

POINTS = np.array([-2.0, -0.7, 0.0, 0.3, 1.1, 2.5])
LOG_POINTS = np.array([0.2, 0.5, 1.0, 2.0, 7.5])


def _derivatives(fn, points, n: int) -> list:
    """[f'(p), f''(p), ..., f^(n)(p)] elementwise, by differentiating the gradient again."""
    x = tm.tensor(points, dtype=tm.float64, requires_grad=True)
    y = fn(x)
    out = []
    for _ in range(n):
        (y,) = tm.grad(y.sum(), x, create_graph=True)
        out.append(y.numpy())
    return out


def _tanh_derivatives(x):
    t = np.tanh(x)
    s = 1 - t**2
    return [s, -2 * t * s, -2 * s * (1 - 3 * t**2), 8 * t * s * (2 - 3 * t**2)]


CLOSED_FORMS = {
    "tanh": (tm.tanh, POINTS, _tanh_derivatives),
    "exp": (tm.exp, POINTS, lambda x: [np.exp(x)] * 4),
    "log": (tm.log, LOG_POINTS, lambda x: [1 / x, -1 / x**2, 2 / x**3, -6 / x**4]),
    "sin": (tm.sin, POINTS, lambda x: [np.cos(x), -np.sin(x), -np.cos(x), np.sin(x)]),
    "cos": (tm.cos, POINTS, lambda x: [-np.sin(x), -np.cos(x), np.sin(x), np.cos(x)]),
    "sigmoid": (
        tm.sigmoid,
        POINTS,
        lambda x: (
            lambda s: [
                s * (1 - s),
                s * (1 - s) * (1 - 2 * s),
                s * (1 - s) * (1 - 6 * s + 6 * s**2),
                s * (1 - s) * (1 - 2 * s) * (1 - 12 * s + 12 * s**2),
            ]
        )(1 / (1 + np.exp(-x))),
    ),
    "sqrt": (
        tm.sqrt,
        LOG_POINTS,
        lambda x: [
            0.5 * x**-0.5,
            -0.25 * x**-1.5,
            0.375 * x**-2.5,
            -0.9375 * x**-3.5,
        ],
    ),
    "x**5": (
        lambda x: x**5,
        POINTS,
        lambda x: [5 * x**4, 20 * x**3, 60 * x**2, 120 * x],
    ),
}


@pytest.mark.parametrize("name", CLOSED_FORMS)
def test_first_to_fourth_derivative_closed_form(name):
    fn, points, formulas = CLOSED_FORMS[name]
    got = _derivatives(fn, points, 4)
    for order, (g, expected) in enumerate(zip(got, formulas(points)), start=1):
        np.testing.assert_allclose(
            g, expected, rtol=1e-10, atol=1e-12, err_msg=f"{name}: derivative {order}"
        )


def _hessian(f, x) -> np.ndarray:
    """The full Hessian, one row per backward pass through the (retained) gradient graph."""
    (g,) = tm.grad(f(x), x, create_graph=True)
    rows = []
    for i in range(x.shape[0]):
        (row,) = tm.grad(g[i], x, retain_graph=True, allow_unused=True)
        rows.append(np.zeros(x.shape) if row is None else row.numpy())
    return np.stack(rows)


@pytest.mark.parametrize(
    "form",
    [
        lambda x, a: x @ (a @ x),
        lambda x, a: tm.einsum("i,ij,j->", x, a, x),
        lambda x, a: (x * (a @ x)).sum(),
        lambda x, a: (x.reshape(1, -1) @ a @ x.reshape(-1, 1)).sum(),
    ],
    ids=["matmul", "einsum", "mul-sum", "row-matrix-column"],
)
def test_hessian_of_quadratic_form_is_a_plus_a_transpose(form):
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((5, 5))  # not symmetric
    a = tm.tensor(a_np)
    x = tm.tensor(rng.standard_normal(5), requires_grad=True)
    h = _hessian(lambda x: form(x, a), x)
    np.testing.assert_allclose(h, a_np + a_np.T, rtol=1e-12, atol=1e-12)


def test_hessian_of_a_non_quadratic_function_is_symmetric_and_matches_formula():
    # f(x) = sum(exp(x)) * x0 ; H_ij = e_i * d_ij * x0 + e_i * d_j0 + e_j * d_i0
    x_np = np.array([0.3, -0.5, 1.2])
    x = tm.tensor(x_np, requires_grad=True)
    h = _hessian(lambda x: x.exp().sum() * x[0], x)
    e = np.exp(x_np)
    expected = np.diag(e) * x_np[0]
    expected[:, 0] += e
    expected[0, :] += e
    np.testing.assert_allclose(h, expected, rtol=1e-12)
    np.testing.assert_allclose(h, h.T, rtol=1e-12)


# --- a tiny tanh MLP: Hessian-vector product vs finite differences of gradients ----------------


def _mlp_loss(theta, x, y):
    """Mean squared error of a 3-4-1 tanh network whose parameters are packed in ``theta``."""
    w1 = theta[0:12].reshape(3, 4)
    b1 = theta[12:16]
    w2 = theta[16:20].reshape(4, 1)
    b2 = theta[20]
    pred = (x @ w1 + b1).tanh() @ w2 + b2
    return ((pred - y) ** 2).mean()


def _mlp_grad(theta_np, x, y) -> np.ndarray:
    theta = tm.tensor(theta_np, requires_grad=True)
    (g,) = tm.grad(_mlp_loss(theta, x, y), theta)
    return g.numpy()


def test_hessian_vector_product_of_mlp_matches_finite_differences_of_gradients():
    rng = np.random.default_rng(1)
    x = tm.tensor(rng.standard_normal((8, 3)))
    y = tm.tensor(rng.standard_normal((8, 1)))
    theta_np = 0.5 * rng.standard_normal(21)
    v = rng.standard_normal(21)

    theta = tm.tensor(theta_np, requires_grad=True)
    (g,) = tm.grad(_mlp_loss(theta, x, y), theta, create_graph=True)
    (hv,) = tm.grad((g * tm.tensor(v)).sum(), theta)

    eps = 1e-5
    fd = (_mlp_grad(theta_np + eps * v, x, y) - _mlp_grad(theta_np - eps * v, x, y)) / (2 * eps)
    np.testing.assert_allclose(hv.numpy(), fd, rtol=1e-6, atol=1e-8)
    assert np.abs(hv.numpy()).max() > 1e-3  # not trivially zero


def test_hvp_via_backward_create_graph_matches_grad():
    rng = np.random.default_rng(2)
    x = tm.tensor(rng.standard_normal((8, 3)))
    y = tm.tensor(rng.standard_normal((8, 1)))
    theta_np = 0.5 * rng.standard_normal(21)
    v = tm.tensor(rng.standard_normal(21))

    theta = tm.tensor(theta_np, requires_grad=True)
    _mlp_loss(theta, x, y).backward(create_graph=True)
    (hv_backward,) = tm.grad((theta.grad * v).sum(), theta)

    theta2 = tm.tensor(theta_np, requires_grad=True)
    (g,) = tm.grad(_mlp_loss(theta2, x, y), theta2, create_graph=True)
    (hv_grad,) = tm.grad((g * v).sum(), theta2)
    np.testing.assert_allclose(hv_backward.numpy(), hv_grad.numpy(), rtol=1e-12)


# --- third order, non-leaf inputs ---------------------------------------------------------------


def test_third_derivative_of_a_composition():
    # f = exp(sin x):  f''' = exp(sin x) cos x (cos^2 x - 3 sin x - 1)
    third = _derivatives(lambda x: x.sin().exp(), POINTS, 3)[2]
    s, c = np.sin(POINTS), np.cos(POINTS)
    np.testing.assert_allclose(third, np.exp(s) * c * (c**2 - 3 * s - 1), rtol=1e-10, atol=1e-12)


def test_mixed_third_partial_derivative():
    # f(x, y) = x^2 y^3 + sin(x y):  d3f / dx dy dy = 12 x y - 2 x sin(xy) - x^2 y cos(xy)
    #   (d/dy: 3x^2y^2 + x cos(xy); d2/dy2: 6x^2 y - x^2 sin(xy);
    #    d/dx of that: 12 x y - 2x sin(xy) - x^2 y cos(xy))
    xv, yv = 0.7, -1.3
    x = tm.tensor(xv, dtype=tm.float64, requires_grad=True)
    y = tm.tensor(yv, dtype=tm.float64, requires_grad=True)
    f = x**2 * y**3 + (x * y).sin()
    (fy,) = tm.grad(f, y, create_graph=True)
    (fyy,) = tm.grad(fy, y, create_graph=True)
    (fyyx,) = tm.grad(fyy, x)
    xy = xv * yv
    expected = 12 * xv * yv - 2 * xv * np.sin(xy) - xv**2 * yv * np.cos(xy)
    assert fyyx.item() == pytest.approx(expected, rel=1e-12)


def test_grad_of_grad_wrt_a_non_leaf_input():
    x = tm.tensor([0.2, -0.4], dtype=tm.float64, requires_grad=True)
    h = x.exp()  # not a leaf
    y = (h**3).sum()
    (gh,) = tm.grad(y, h, create_graph=True)  # 3 h^2
    np.testing.assert_allclose(gh.numpy(), 3 * h.numpy() ** 2, rtol=1e-12)
    ggh, ggx = tm.grad(gh.sum(), [h, x])  # d/dh: 6 h;  d/dx: 6 h * dh/dx = 6 h^2
    np.testing.assert_allclose(ggh.numpy(), 6 * h.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ggx.numpy(), 6 * h.numpy() ** 2, rtol=1e-12)


def test_second_derivative_of_piecewise_linear_ops_is_zero_but_flows():
    # relu, abs, max and clip have zero curvature away from their kinks; the gradient of
    # the gradient must still be computable (a zero, or unused), not an error.
    x = tm.tensor([-1.5, 0.5, 2.0], dtype=tm.float64, requires_grad=True)
    for fn in (tm.relu, tm.abs, lambda t: t.clip(-1.0, 1.0), lambda t: t.max()):
        (g,) = tm.grad(fn(x).sum() * 3.0, x, create_graph=True)
        (gg,) = tm.grad((g * x).sum(), x, allow_unused=True)  # d/dx <g(x), x> = g + 0
        np.testing.assert_allclose(gg.numpy(), g.numpy())
