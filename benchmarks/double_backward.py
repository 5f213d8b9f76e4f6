"""W4 of BENCHMARKS.md, the double backward alone, in each framework and by hand in NumPy.

f = sum(tanh(x @ W1) @ W2) with x 64x100, W1 100x100, W2 100x1 (float32);
g = df/dW1 with a graph (create_graph=True); then h = d sum(g * g) / dW1.
Each builder returns (step, gradient): ``step()`` computes h once,
``gradient()`` returns {"W1": h} as a NumPy array for the agreement check.

The NumPy version is the no-framework floor, derived by hand (T = tanh(x W1),
w = W2 as a row, 1 - T^2 = tanh'):
    g = x^T D,            D = (1 - T^2) * w
    dL/dD = x (2 g)       (L = sum(g^2), and g is linear in D)
    dL/dA = dL/dD * (-2 T (1 - T^2)) * w      (dD/dA, A = x W1)
    h = x^T dL/dA
Four matrix products: the forward's, g's, and the two of the backward.
"""

from __future__ import annotations

BATCH, FEATURES, HIDDEN = 64, 100, 100


def w4_data(np) -> dict:
    rng = np.random.default_rng(4)
    return {
        "x": rng.standard_normal((BATCH, FEATURES)).astype("float32"),
        "W1": (rng.standard_normal((FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype("float32"),
        "W2": (rng.standard_normal((HIDDEN, 1)) / np.sqrt(HIDDEN)).astype("float32"),
    }


def matmul_flops() -> int:
    """The four products above (multiply-add = 2)."""
    n, d, h = BATCH, FEATURES, HIDDEN
    return 2 * (n * d * h) * 4


def build_numpy(np, arrays: dict):
    x, W1, W2 = arrays["x"], arrays["W1"], arrays["W2"]
    w = W2[:, 0]

    def second_derivative():
        t = np.tanh(x @ W1)
        dtanh = 1.0 - t * t
        g = x.T @ (dtanh * w)
        grad_d = x @ (2.0 * g)
        grad_a = grad_d * (-2.0 * t * dtanh) * w
        return x.T @ grad_a

    return second_derivative, lambda: {"W1": second_derivative()}


def build_tinymeta(tm, arrays: dict):
    x, W2 = tm.tensor(arrays["x"]), tm.tensor(arrays["W2"])
    W1 = tm.tensor(arrays["W1"], requires_grad=True)

    def second_derivative():
        f = (tm.tanh(x @ W1) @ W2).sum()
        (g,) = tm.grad(f, W1, create_graph=True)
        (h,) = tm.grad((g * g).sum(), W1)
        return h

    return second_derivative, lambda: {"W1": second_derivative().numpy()}


def build_torch(torch, arrays: dict):
    x, W2 = torch.tensor(arrays["x"]), torch.tensor(arrays["W2"])
    W1 = torch.tensor(arrays["W1"]).requires_grad_(True)

    def second_derivative():
        f = (torch.tanh(x @ W1) @ W2).sum()
        (g,) = torch.autograd.grad(f, W1, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), W1)
        return h

    return second_derivative, lambda: {"W1": second_derivative().numpy()}


def build_hips(arrays: dict):
    import autograd.numpy as anp
    from autograd import grad

    x, W1, W2 = arrays["x"], arrays["W1"], arrays["W2"]

    def f(w1):
        return anp.sum(anp.tanh(x @ w1) @ W2)

    g = grad(f)
    second = grad(lambda w1: anp.sum(g(w1) ** 2))

    def second_derivative():
        return second(W1)

    return second_derivative, lambda: {"W1": second_derivative()}
