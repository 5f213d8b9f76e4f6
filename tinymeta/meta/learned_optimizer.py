"""A learned inner optimizer (Andrychowicz et al. 2016, coordinate-wise).

A tiny MLP is applied to every coordinate of every parameter independently:
from the coordinate's gradient g (and the previous update, a one-step memory
like momentum) it outputs the update. It starts as plain SGD,

    update = lr * g + scale * mlp([g, tanh(g), previous update]),

with ``scale`` = 0, so at initialisation it is exactly MAML's inner step, and
meta-training (backprop through the unrolled inner loop) learns the
correction. Because the MLP is built from tinymeta ops, the update is
differentiable w.r.t. both the MLP's weights and the gradient, so it works as
the inner optimizer of second-order MAML.
"""

from __future__ import annotations

import numpy as np

from tinymeta import ops
from tinymeta.creation import tensor


class LearnedOptimizer:
    """p' = p - (lr * g + scale * mlp(features(g)))  (coordinate-wise).

    ``device`` puts its weights where the parameters it updates live ("cuda" for a
    model on the GPU).
    """

    n_features = 3

    def __init__(self, lr: float = 0.01, hidden: int = 20, rng=None, dtype=np.float32, device=None):
        rng = np.random.default_rng(rng)
        bound = 1.0 / np.sqrt(self.n_features)
        values = {
            "w1": rng.uniform(-bound, bound, (self.n_features, hidden)),
            "b1": np.zeros(hidden),
            "w2": rng.uniform(-1, 1, (hidden, 1)) / np.sqrt(hidden),
            "b2": np.zeros(1),
            "log_lr": np.log(lr),
            "scale": 0.0,
        }
        self.weights = {}
        for k, v in values.items():
            w = tensor(v, dtype=dtype, device=device, requires_grad=True)
            w.name = f"learned_opt.{k}"
            self.weights[k] = w

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
            update = ops.exp(w["log_lr"]) * g + w["scale"] * correction
            state[k] = update
            new[k] = params[k] - update
        return new

    def parameters(self) -> list:
        return list(self.weights.values())

    def named_parameters(self) -> dict:
        return {f"learned_opt.{k}": v for k, v in self.weights.items()}
