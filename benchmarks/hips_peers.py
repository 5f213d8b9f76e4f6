"""HIPS autograd (``pip install autograd``) as a peer on W1 (sinusoid MAML) and W3 (MLP step).

HIPS autograd differentiates plain NumPy code by tracing it: ``grad(f)(x)``
returns a function's gradient, and a ``grad`` inside the function being
differentiated gives second order for free. It has no ``vmap``, so W1 loops
over tasks as learn2learn does. Its outer optimizer is the Adam below (NumPy,
PyTorch's update rule), so that a step does the same work as the others'.

Imported only when autograd is installed; NumPy must already be set up (threads).
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd import grad, value_and_grad
from autograd.tracer import getval
from maml_workloads import OUTER_LR, W1_LR


class NumpyAdam:
    """Adam on a dict of NumPy arrays, with PyTorch's update rule (in place)."""

    def __init__(self, params: dict, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads: dict) -> None:
        b1, b2 = self.betas
        self.t += 1
        step_size = self.lr / (1 - b1**self.t)
        root_correction = np.sqrt(1 - b2**self.t)
        for k, p in self.params.items():
            g = grads[k]
            self.m[k] *= b1
            self.m[k] += (1 - b1) * g
            self.v[k] *= b2
            self.v[k] += (1 - b2) * g * g
            p -= step_size * self.m[k] / (np.sqrt(self.v[k]) / root_correction + self.eps)


def mlp(p: dict, x):
    h = anp.maximum(x @ p["w1"].T + p["b1"], 0.0)
    h = anp.maximum(h @ p["w2"].T + p["b2"], 0.0)
    return h @ p["w3"].T + p["b3"]


def logsumexp(z, axis: int):
    """log sum exp z along axis, shifted by the (constant) max for stability.

    The shift m cancels in the value, so its gradient cancels too: taking it
    as a constant (getval) gives the same derivative with less tracing.
    """
    m = getval(z).max(axis=axis, keepdims=True)
    return anp.log(anp.sum(anp.exp(z - m), axis=axis)) + anp.squeeze(m, axis=axis)


def mse(prediction, target):
    return anp.mean((prediction - target) ** 2)


def w1(weights: dict, data: list, steps: int, first_order: bool = False):
    """W1 meta-iteration: (step, gradient) like maml_workloads' builders."""
    params = {k: v.copy() for k, v in weights.items()}
    opt = NumpyAdam(params, OUTER_LR)
    xs, ys, xq, yq = data

    def meta_loss(p0: dict):
        total = 0.0
        for t in range(len(xs)):
            p = p0
            for _ in range(steps):
                g = grad(lambda p_, t=t: mse(mlp(p_, xs[t]), ys[t]))(p)
                if first_order:  # getval strips the trace: the inner gradient becomes a constant
                    g = {k: getval(v) for k, v in g.items()}
                p = {k: p[k] - W1_LR * g[k] for k in p}
            total = total + mse(mlp(p, xq[t]), yq[t])
        return total / len(xs)

    meta_gradient = grad(meta_loss)

    def step():
        opt.step(meta_gradient(params))

    def gradient() -> dict:
        return {k: np.asarray(v) for k, v in meta_gradient(params).items()}

    return step, gradient


class HipsMLP:
    """W3 in HIPS autograd: same net, loss and SGD as bench_w3_mlp's implementations."""

    def __init__(self, params: list, lr: float):
        self.params = [p.copy() for p in params]
        self.lr = lr

    def _loss(self, params, x, y):
        w1, b1, w2, b2, w3, b3 = params
        h1 = anp.maximum(x @ w1.T + b1, 0.0)
        h2 = anp.maximum(h1 @ w2.T + b2, 0.0)
        logits = h2 @ w3.T + b3
        return anp.mean(logsumexp(logits, axis=1) - logits[np.arange(len(y)), y])

    def step(self, x, y) -> float:
        loss, grads = value_and_grad(self._loss)(self.params, x, y)
        for p, g in zip(self.params, grads):
            p -= self.lr * g
        return float(loss)

    def arrays(self) -> list:
        return self.params
