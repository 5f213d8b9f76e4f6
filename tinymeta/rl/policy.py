"""Policies as functions of a parameter dict, with an optional leading task axis.

    policy = GaussianMLPPolicy(2, 2, hidden=(100, 100))
    params = policy.init_params(rng)               # {"l0.weight", ..., "log_std"}
    dist = policy(params, obs)                     # DiagGaussian over actions

A parameter may carry a leading task axis (``per_task``): weights ``(T, out, in)``,
biases ``(T, out)``, log std ``(T, act_dim)``; observations are then ``(T, N, obs_dim)``
and every task runs through its own copy in one batched matmul per layer.
"""

from __future__ import annotations

import numpy as np

import tinymeta.nn.functional as F
from tinymeta.ops import reshape, tanh
from tinymeta.rl.distributions import Categorical, DiagGaussian
from tinymeta.tensor import Tensor

_ACTIVATIONS = {"relu": F.relu, "tanh": tanh}


class MLPPolicy:
    """An MLP trunk ``obs_dim -> hidden... -> out_dim``; subclasses turn its output into a
    distribution."""

    def __init__(
        self, obs_dim: int, out_dim: int, hidden=(100, 100), activation: str = "relu"
    ) -> None:
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation}")
        self.obs_dim = int(obs_dim)
        self.sizes = [self.obs_dim, *[int(h) for h in hidden], int(out_dim)]
        self.activation = activation
        self.num_layers = len(self.sizes) - 1

    def init_params(self, rng=None, dtype=np.float64) -> dict:
        """Glorot-uniform weights and zero biases (rllab's initialisation), as leaves that
        require grad."""
        rng = np.random.default_rng(rng)
        params = {}
        for i, (n_in, n_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            bound = np.sqrt(6.0 / (n_in + n_out))
            w = rng.uniform(-bound, bound, size=(n_out, n_in)).astype(dtype)
            params[f"l{i}.weight"] = Tensor(w, requires_grad=True)
            params[f"l{i}.bias"] = Tensor(np.zeros(n_out, dtype=dtype), requires_grad=True)
        return params

    def trunk(self, params: dict, obs) -> Tensor:
        obs = obs if isinstance(obs, Tensor) else Tensor(np.asarray(obs))
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"policy: observations must end in {self.obs_dim}, got {obs.shape}")
        act = _ACTIVATIONS[self.activation]
        h = obs
        for i in range(self.num_layers):
            h = F.linear(h, params[f"l{i}.weight"], params[f"l{i}.bias"])
            if i < self.num_layers - 1:
                h = act(h)
        return h


class GaussianMLPPolicy(MLPPolicy):
    """pi(a | s) = N(MLP(s), diag(exp(log_std))^2), the log std learned but state-independent."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden=(100, 100),
        activation: str = "relu",
        init_std: float = 1.0,
    ) -> None:
        super().__init__(obs_dim, act_dim, hidden, activation)
        self.act_dim = int(act_dim)
        self.init_std = float(init_std)

    def init_params(self, rng=None, dtype=np.float64) -> dict:
        params = super().init_params(rng, dtype)
        log_std = np.full(self.act_dim, np.log(self.init_std), dtype=dtype)
        params["log_std"] = Tensor(log_std, requires_grad=True)
        return params

    def __call__(self, params: dict, obs) -> DiagGaussian:
        mean = self.trunk(params, obs)
        log_std = params["log_std"]
        if log_std.ndim == 2:  # (T, act_dim) with a task axis: line it up with (T, N, act_dim)
            log_std = reshape(log_std, (log_std.shape[0],) + (1,) * (mean.ndim - 2) + (-1,))
        return DiagGaussian(mean, log_std)


class CategoricalMLPPolicy(MLPPolicy):
    """pi(a | s) = softmax(MLP(s)) over ``n_actions`` discrete actions."""

    def __init__(self, obs_dim: int, n_actions: int, hidden=(100, 100), activation="relu"):
        super().__init__(obs_dim, n_actions, hidden, activation)
        self.n_actions = int(n_actions)

    def __call__(self, params: dict, obs) -> Categorical:
        return Categorical(self.trunk(params, obs))
