"""Action distributions of a policy: a diagonal Gaussian and a categorical.

Each is built from tinymeta tensors (the policy network's outputs), and ``log_prob``,
``entropy`` and ``kl`` are compositions of differentiable ops, so their gradients exist
to any order: the inner policy-gradient step differentiates ``log_prob``, the
meta-gradient differentiates that again, and TRPO's Fisher-vector product is the
Hessian of ``kl``. ``sample`` draws actions as plain NumPy arrays (they are data, not
part of the graph).
"""

from __future__ import annotations

import math

import numpy as np

import tinymeta.nn.functional as F
from tinymeta.ops import exp
from tinymeta.ops import sum as tsum
from tinymeta.tensor import Tensor

_LOG_2PI = math.log(2.0 * math.pi)


def _as_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(np.asarray(x))


class DiagGaussian:
    """N(mean, diag(exp(log_std))^2) over the last axis; ``log_std`` broadcasts against
    ``mean`` (a policy's state-independent log std is ``(act_dim,)``, or ``(T, 1, act_dim)``
    with a task axis)."""

    def __init__(self, mean: Tensor, log_std: Tensor):
        self.mean = _as_tensor(mean)
        self.log_std = _as_tensor(log_std)
        try:
            np.broadcast_shapes(self.mean.shape, self.log_std.shape)
        except ValueError:
            raise ValueError(
                f"DiagGaussian: log_std {self.log_std.shape} does not broadcast against "
                f"mean {self.mean.shape}"
            ) from None

    @property
    def dim(self) -> int:
        return self.mean.shape[-1]

    def detach(self) -> DiagGaussian:
        """The same distribution as constants (TRPO's old policy)."""
        return DiagGaussian(self.mean.detach(), self.log_std.detach())

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """mean + std * eps, eps ~ N(0, I): an array of ``mean``'s shape (no graph)."""
        mean = self.mean.numpy()
        return mean + np.exp(self.log_std.numpy()) * rng.standard_normal(mean.shape)

    def log_prob(self, x) -> Tensor:
        """log N(x) = -1/2 sum(((x - mean) / std)^2) - sum(log_std) - d/2 log(2 pi)."""
        z = (_as_tensor(x) - self.mean) * exp(-self.log_std)
        return tsum(z * z, axis=-1) * -0.5 - self._sum_log_std() - 0.5 * self.dim * _LOG_2PI

    def entropy(self) -> Tensor:
        """H = sum(log_std) + d/2 (1 + log(2 pi)), broadcast to the batch shape."""
        h = self._sum_log_std() + 0.5 * self.dim * (1.0 + _LOG_2PI)
        return h + tsum(self.mean * 0.0, axis=-1)  # carry the batch shape of mean

    def kl(self, other: DiagGaussian) -> Tensor:
        """KL(self || other) = sum(log s2/s1 + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2)."""
        if not isinstance(other, DiagGaussian):
            raise TypeError(f"DiagGaussian.kl: other must be a DiagGaussian, got {type(other)}")
        var_ratio = exp((self.log_std - other.log_std) * 2.0)
        diff = (self.mean - other.mean) * exp(-other.log_std)
        terms = (other.log_std - self.log_std) + (var_ratio + diff * diff - 1.0) * 0.5
        return tsum(terms, axis=-1)

    def _sum_log_std(self) -> Tensor:
        return tsum(self.log_std, axis=-1)


class Categorical:
    """A distribution over ``n`` actions given by unnormalised ``logits`` (..., n)."""

    def __init__(self, logits: Tensor):
        self.logits = _as_tensor(logits)
        self.log_probs = F.log_softmax(self.logits, axis=-1)  # log p, stable (max-shifted)

    @property
    def n(self) -> int:
        return self.logits.shape[-1]

    def detach(self) -> Categorical:
        """The same distribution as constants (TRPO's old policy)."""
        return Categorical(self.logits.detach())

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """Integer actions of the batch shape, by the Gumbel-max trick."""
        gumbel = -np.log(-np.log(rng.uniform(size=self.logits.shape)))
        return np.argmax(self.logits.numpy() + gumbel, axis=-1)

    def log_prob(self, actions) -> Tensor:
        """log p[a]: the log-probabilities picked by a one-hot mask (differentiable in logits)."""
        actions = np.asarray(actions)
        if not np.issubdtype(actions.dtype, np.integer):
            raise TypeError(f"Categorical.log_prob: actions must be integers, got {actions.dtype}")
        if actions.shape != self.logits.shape[:-1]:
            raise ValueError(
                f"Categorical.log_prob: actions {actions.shape} must have the batch shape "
                f"{self.logits.shape[:-1]}"
            )
        if actions.size and (actions.min() < 0 or actions.max() >= self.n):
            raise ValueError(f"Categorical.log_prob: actions must lie in [0, {self.n})")
        one_hot = (actions[..., None] == np.arange(self.n)).astype(self.logits.dtype)
        return tsum(self.log_probs * one_hot, axis=-1)

    def entropy(self) -> Tensor:
        """H = -sum p log p."""
        return -tsum(exp(self.log_probs) * self.log_probs, axis=-1)

    def kl(self, other: Categorical) -> Tensor:
        """KL(self || other) = sum p (log p - log q)."""
        if not isinstance(other, Categorical):
            raise TypeError(f"Categorical.kl: other must be a Categorical, got {type(other)}")
        return tsum(exp(self.log_probs) * (self.log_probs - other.log_probs), axis=-1)
