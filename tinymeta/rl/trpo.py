"""Trust-region policy optimisation's step (Schulman et al. 2015), for any objective.

``trpo_step(params, objective)`` minimises a surrogate loss subject to a mean-KL
constraint. ``objective(params, create_graph)`` returns ``(loss, kl)`` as scalars
whose graph reaches ``params`` (for MAML, through the inner policy-gradient step).

    direction = F^{-1} (-g)        conjugate gradient on Fisher-vector products,
                                   F v = Hessian(mean KL) v + damping v, by double backward
    step      = sqrt(2 max_kl / direction^T F direction) * direction
    accept the first of step, ratio * step, ratio^2 * step, ... that lowers the loss and
    keeps the KL within max_kl (else leave params unchanged).

Data parallelism: ``reduce`` (default: the identity) maps a flat float64 NumPy vector to
its sum over processes. When each process's ``objective`` covers a share of the tasks,
weighted so that the shares sum to the whole (see ``MetaObjective(total_tasks=...)``),
``trpo_step`` reduces the gradient with the loss, every Fisher-vector product, and each
line-search trial's (loss, KL), so every process takes the same step. This module imports
no MPI: examples/maml_rl.py passes a sum over ``tinymeta.distributed``'s ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tinymeta.autograd import grad
from tinymeta.grad_mode import no_grad
from tinymeta.ops import sum as tsum
from tinymeta.tensor import Tensor


def flatten(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def unflatten(vector: np.ndarray, like: list) -> list:
    out, start = [], 0
    for p in like:
        out.append(vector[start : start + p.size].reshape(p.shape).astype(p.dtype))
        start += p.size
    return out


def conjugate_gradient(
    matvec: Callable, b: np.ndarray, iters: int = 10, tol: float = 1e-10
) -> np.ndarray:
    """Approximately solve A x = b for symmetric positive definite A given only ``matvec``
    (x = 0 to start; stops early once the residual's squared norm is below ``tol``)."""
    x = np.zeros_like(b)
    r = b.copy()
    p = b.copy()
    rr = r @ r
    for _ in range(iters):
        if rr < tol:
            break
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x += alpha * p
        r -= alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


class FisherVectorProduct:
    """v -> Hessian(kl) v + damping v, with ``kl``'s gradient graph built once and reused
    for every product (each product is one more backward through it)."""

    def __init__(self, kl: Tensor, params: list, damping: float = 0.0):
        self.params = params
        self.damping = damping
        self.grads = grad(kl, params, create_graph=True)

    def __call__(self, v: np.ndarray) -> np.ndarray:
        vs = unflatten(v, self.params)
        gv = None
        for g, vk in zip(self.grads, vs):
            term = tsum(g * Tensor(vk))
            gv = term if gv is None else gv + term
        hv = grad(gv, self.params, retain_graph=True)
        return flatten([h.data for h in hv]) + self.damping * v


def _identity(vector: np.ndarray) -> np.ndarray:
    return vector


def trpo_step(
    params: dict,
    objective: Callable,
    max_kl: float = 0.01,
    damping: float = 1e-5,
    cg_iters: int = 10,
    ls_steps: int = 15,
    ls_ratio: float = 0.8,
    reduce: Callable | None = None,
) -> dict:
    """One TRPO update of the leaves in ``params`` (in place); returns a dict of diagnostics
    (``loss_before``, ``loss_after``, ``kl``, ``step_fraction``: 0 if no step was accepted).
    ``reduce``: a sum over processes of a flat vector (module docstring); None: one process."""
    if reduce is None:
        reduce = _identity
    keys = list(params)
    plist = [params[k] for k in keys]
    loss, kl = objective(params, create_graph=True)
    g = flatten([x.data for x in grad(loss, plist, retain_graph=True)] + [loss.data])
    g = reduce(g)
    g, loss_before = g[:-1], float(g[-1])
    fvp = FisherVectorProduct(kl, plist)  # damping added after the sum, once

    def matvec(v: np.ndarray) -> np.ndarray:
        return reduce(fvp(v)) + damping * v

    direction = conjugate_gradient(matvec, -g, cg_iters)
    curvature = direction @ matvec(direction)
    info = {"loss_before": loss_before, "loss_after": loss_before, "kl": 0.0}
    info["step_fraction"] = 0.0
    if not np.isfinite(curvature) or curvature <= 0.0:
        return info  # no trust region to scale by: skip the update
    full_step = np.sqrt(2.0 * max_kl / curvature) * direction
    start = [p.data.copy() for p in plist]
    steps = unflatten(full_step, plist)
    fraction = 1.0
    for _ in range(ls_steps):
        candidate = {
            k: Tensor(x0 + fraction * s, requires_grad=True) for k, x0, s in zip(keys, start, steps)
        }
        new_loss, new_kl = objective(candidate, create_graph=False)
        new_loss, new_kl = reduce(np.array([new_loss.item(), new_kl.item()], dtype=np.float64))
        new_loss, new_kl = float(new_loss), float(new_kl)
        if new_loss < info["loss_before"] and new_kl <= max_kl:
            with no_grad():
                for p, c in zip(plist, candidate.values()):
                    p.copy_(c)  # in place, bumping the version counter graphs check
            info.update(loss_after=new_loss, kl=new_kl, step_fraction=fraction)
            break
        fraction *= ls_ratio
    return info
