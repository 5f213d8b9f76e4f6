"""Derivatives of any order with tinymeta.

1. Newton's method on the Rosenbrock function with the exact Hessian, built
   row by row from gradients of the gradient (create_graph=True).
2. The third derivative of tanh from three nested tm.grad calls, against its
   closed form.
3. A Hessian-vector product of a tiny MLP's loss (one extra backward pass, no
   Hessian matrix) against a finite difference of gradients.

Run:  python examples/higher_order.py
"""

from __future__ import annotations

import argparse

import numpy as np

import tinymeta as tm
from tinymeta._checks import positive_int


def rosenbrock(p):
    x, y = p[0], p[1]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def gradient_and_hessian(f, p):
    """g = df/dp and H = d2f/dp2 (each row of H is the gradient of one g_i)."""
    (g,) = tm.grad(f(p), p, create_graph=True)
    rows = [tm.grad(g[i], p, retain_graph=True)[0] for i in range(p.shape[0])]
    return g.detach(), tm.stack(rows)


def newton(start, steps: int):
    p = tm.tensor(start, dtype=tm.float64, requires_grad=True)
    print("Newton's method on Rosenbrock, exact Hessians:")
    for k in range(steps):
        g, H = gradient_and_hessian(rosenbrock, p)
        step = np.linalg.solve(H.numpy(), g.numpy())
        print(f"  step {k}: p = {p.numpy().round(6)}, f = {rosenbrock(p).item():.3e}")
        p = tm.tensor(p.numpy() - step, dtype=tm.float64, requires_grad=True)
    print(f"  final: p = {p.numpy().round(8)} (minimum at [1, 1])")
    return p


def tanh_third_derivative(x0: float):
    x = tm.tensor(x0, dtype=tm.float64, requires_grad=True)
    (d1,) = tm.grad(tm.tanh(x), x, create_graph=True)
    (d2,) = tm.grad(d1, x, create_graph=True)
    (d3,) = tm.grad(d2, x)
    t = np.tanh(x0)
    closed = -2 * (1 - t**2) * (1 - 3 * t**2)  # d3/dx3 tanh = -2 sech^2 (1 - 3 tanh^2)
    print(f"\nd3/dx3 tanh at {x0}: tinymeta {d3.item():.12f}, closed form {closed:.12f}")
    return d3.item(), closed


def mlp_loss(params, x, y):
    w1, b1, w2, b2 = params
    h = tm.tanh(x @ w1 + b1)
    return ((h @ w2 + b2 - y) ** 2).mean()


def hessian_vector_product(seed: int):
    rng = np.random.default_rng(seed)
    x = tm.tensor(rng.standard_normal((16, 3)), dtype=tm.float64)
    y = tm.tensor(rng.standard_normal((16, 1)), dtype=tm.float64)
    shapes = [(3, 8), (8,), (8, 1), (1,)]
    params = [tm.tensor(rng.standard_normal(s) * 0.5, requires_grad=True) for s in shapes]
    vs = [tm.tensor(rng.standard_normal(s)) for s in shapes]

    grads = tm.grad(mlp_loss(params, x, y), params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vs))
    hvp = tm.grad(dot, params)  # d/dp (g . v) = H v

    eps = 1e-6  # central difference of gradients along v
    shifted = [
        [tm.tensor(p.numpy() + s * eps * v.numpy(), requires_grad=True) for p, v in zip(params, vs)]
        for s in (1, -1)
    ]
    g_plus = tm.grad(mlp_loss(shifted[0], x, y), shifted[0])
    g_minus = tm.grad(mlp_loss(shifted[1], x, y), shifted[1])
    fd = [(a.numpy() - b.numpy()) / (2 * eps) for a, b in zip(g_plus, g_minus)]
    err = max(float(np.abs(h.numpy() - f).max()) for h, f in zip(hvp, fd))
    print(f"\nHessian-vector product of a 3-8-1 tanh MLP: max |Hv - finite diff| = {err:.2e}")
    return err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=8, help="Newton steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    newton([-1.2, 1.0], args.steps)
    tanh_third_derivative(0.3)
    hessian_vector_product(args.seed)


if __name__ == "__main__":
    main()
