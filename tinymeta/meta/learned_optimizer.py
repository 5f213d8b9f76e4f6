"""A learned inner optimizer (Andrychowicz et al. 2016, coordinate-wise).

A tiny MLP is applied to every coordinate of every parameter independently:
from the coordinate's gradient g (and the previous update, a one-step memory
like momentum) it outputs the update. It starts as plain SGD,

    update = lr * g + scale * mlp([g, tanh(g), previous update]),

with ``scale`` = 0, so at initialisation it is exactly MAML's inner step, and
meta-training (backprop through the unrolled inner loop) learns the
correction. Given the parameters it will update (``params=``), ``lr`` becomes
one learned rate per coordinate, as in Meta-SGD, and the MLP corrects that
preconditioned step: one network shared by all coordinates cannot tell a bias
from a weight, a per-coordinate rate can. Because the MLP is built from
tinymeta ops, the update is differentiable w.r.t. both the MLP's weights and
the gradient, so it works as the inner optimizer of second-order MAML.
"""

from __future__ import annotations

import numpy as np

from tinymeta import ops
from tinymeta._checks import check_int, check_positive
from tinymeta.creation import tensor


class LearnedOptimizer:
    """p' = p - (lr * g + scale * mlp(features(g)))  (coordinate-wise).

    ``params`` (name -> tensor, optional): learn a rate per coordinate of each of these
    parameters (initialised to ``lr``) instead of one shared rate; the weights then take the
    parameters' dtype and device unless given. Without ``params``, ``device`` puts the
    weights where the parameters it updates live ("cuda" for a model on the GPU), and
    ``dtype`` defaults to float32.
    """

    n_features = 3

    def __init__(
        self,
        lr: float = 0.01,
        hidden: int = 20,
        rng=None,
        dtype=None,
        device=None,
        params: dict | None = None,
    ):
        lr = check_positive("lr", lr, "LearnedOptimizer")
        hidden = check_int("hidden", hidden, "LearnedOptimizer", low=1)
        if params:  # live where, and in the precision of, the parameters it updates
            first = next(iter(params.values()))
            dtype = first.dtype if dtype is None else dtype
            device = first.device if device is None else device
        dtype = np.float32 if dtype is None else dtype
        rng = np.random.default_rng(rng)
        bound = 1.0 / np.sqrt(self.n_features)
        values = {
            "w1": rng.uniform(-bound, bound, (self.n_features, hidden)),
            "b1": np.zeros(hidden),
            "w2": rng.uniform(-1, 1, (hidden, 1)) / np.sqrt(hidden),
            "b2": np.zeros(1),
            "scale": 0.0,
        }
        if params is None:
            values["log_lr"] = np.log(lr)
        else:
            values.update({f"log_lr.{k}": np.full(p.shape, np.log(lr)) for k, p in params.items()})
        self.per_coordinate = params is not None
        self.weights = {}
        for k, v in values.items():
            w = tensor(v, dtype=dtype, device=device, requires_grad=True)
            w.name = f"learned_opt.{k}"
            self.weights[k] = w

    def _log_lr(self, name: str):
        if not self.per_coordinate:
            return self.weights["log_lr"]
        try:
            return self.weights[f"log_lr.{name}"]
        except KeyError:
            raise KeyError(
                f"LearnedOptimizer: no learned rates for parameter {name!r}; it was built for "
                f"{sorted(k[len('log_lr.') :] for k in self.weights if k.startswith('log_lr.'))}"
            ) from None

    def __call__(self, params: dict, grads: dict, step: int, state: dict) -> dict:
        """``state`` carries each parameter's previous update through one inner loop."""
        w = self.weights
        new = {}
        for k, g in grads.items():
            prev = state.get(k)
            if prev is None:
                prev = g * 0.0
            features = ops.stack([g, ops.tanh(g), prev], axis=-1)
            hidden = ops.tanh(features @ w["w1"] + w["b1"])
            correction = ops.squeeze(hidden @ w["w2"] + w["b2"], -1)
            update = ops.exp(self._log_lr(k)) * g + w["scale"] * correction
            state[k] = update
            new[k] = params[k] - update
        return new

    def parameters(self) -> list:
        return list(self.weights.values())

    def named_parameters(self) -> dict:
        return {f"learned_opt.{k}": v for k, v in self.weights.items()}
