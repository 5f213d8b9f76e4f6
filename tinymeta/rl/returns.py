"""Discounted returns, GAE(lambda) and the linear feature baseline, on batches of episodes.

Arrays have episodes on the leading axes and time last but for features:
``rewards``, ``mask``, ``values`` are ``(..., H)``; ``observations`` ``(..., H, obs_dim)``.
``mask`` is 1 on the valid steps of each episode and 0 after it ended; an episode's
value after its last step is 0 (it terminated, or was cut at the horizon and, as in
MAML's code, not bootstrapped). Plain NumPy: these are targets, not part of the graph.
"""

from __future__ import annotations

import numpy as np


def _mask(rewards: np.ndarray, mask) -> np.ndarray:
    if mask is None:
        return np.ones_like(rewards)
    mask = np.asarray(mask, dtype=rewards.dtype)
    if mask.shape != rewards.shape:
        raise ValueError(f"mask {mask.shape} must have the shape of rewards {rewards.shape}")
    return mask


def discounted_returns(rewards, gamma: float, mask=None) -> np.ndarray:
    """R_t = r_t + gamma R_{t+1} over valid steps (R is 0 on masked steps)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    mask = _mask(rewards, mask)
    out = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[:-1])
    for t in range(rewards.shape[-1] - 1, -1, -1):  # a loop over time only: episodes are arrays
        running = (rewards[..., t] + gamma * running) * mask[..., t]
        out[..., t] = running
    return out


def gae(rewards, values, gamma: float, lam: float, mask=None) -> np.ndarray:
    """Generalised advantage estimation (Schulman et al. 2016):
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1}."""
    rewards = np.asarray(rewards, dtype=np.float64)
    mask = _mask(rewards, mask)
    values = np.asarray(values, dtype=np.float64)
    if values.shape != rewards.shape:
        raise ValueError(f"values {values.shape} must have the shape of rewards {rewards.shape}")
    values = values * mask
    next_values = np.concatenate([values[..., 1:], np.zeros(values.shape[:-1] + (1,))], axis=-1)
    deltas = (rewards + gamma * next_values - values) * mask
    out = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[:-1])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = (deltas[..., t] + gamma * lam * running) * mask[..., t]
        out[..., t] = running
    return out


def normalize(advantages, mask=None, axes=None, eps: float = 1e-8) -> np.ndarray:
    """(A - mean) / (std + eps) over the valid steps of ``axes`` (all axes by default);
    masked steps become 0."""
    advantages = np.asarray(advantages, dtype=np.float64)
    mask = _mask(advantages, mask)
    count = np.maximum(mask.sum(axis=axes, keepdims=True), 1.0)
    mean = (advantages * mask).sum(axis=axes, keepdims=True) / count
    var = (((advantages - mean) * mask) ** 2).sum(axis=axes, keepdims=True) / count
    return (advantages - mean) / (np.sqrt(var) + eps) * mask


class LinearFeatureBaseline:
    """MAML's (rllab's) linear value baseline, one fit per task.

    Features of a step: the observation clipped to [-10, 10], its square, the time
    step u = t / 100, u^2, u^3 and 1. The weights solve the regularised least squares
    (X^T X + reg I) w = X^T R over the task's valid steps (R: discounted returns); if
    that is not finite, reg grows tenfold, as in rllab.
    """

    def __init__(self, reg: float = 1e-5):
        self.reg = reg
        self.weights = None

    @staticmethod
    def features(observations) -> np.ndarray:
        """``(..., H, obs_dim)`` -> ``(..., H, 2 obs_dim + 4)``."""
        obs = np.clip(np.asarray(observations, dtype=np.float64), -10.0, 10.0)
        u = np.arange(obs.shape[-2], dtype=np.float64) / 100.0
        u = np.broadcast_to(u[:, None], obs.shape[:-1] + (1,))
        return np.concatenate([obs, obs**2, u, u**2, u**3, np.ones_like(u)], axis=-1)

    def fit(self, observations, returns, mask=None) -> LinearFeatureBaseline:
        """Fit one weight vector per task. ``observations`` ``(T, R, H, obs_dim)``,
        ``returns`` and ``mask`` ``(T, R, H)``: every task's R episodes share its weights."""
        returns = np.asarray(returns, dtype=np.float64)
        mask = _mask(returns, mask)
        x = self.features(observations) * mask[..., None]
        t = len(x)
        x = x.reshape(t, -1, x.shape[-1])  # (T, R*H, F)
        y = (returns * mask).reshape(t, -1)
        xtx = np.einsum("tnf,tng->tfg", x, x)
        xty = np.einsum("tnf,tn->tf", x, y)
        eye = np.eye(x.shape[-1])
        reg = self.reg
        for _ in range(5):
            weights = np.linalg.solve(xtx + reg * eye, xty[..., None])[..., 0]
            if np.isfinite(weights).all():
                break
            reg *= 10.0
        self.weights = weights
        return self

    def predict(self, observations) -> np.ndarray:
        """Values ``(T, R, H)`` of ``observations`` ``(T, R, H, obs_dim)`` with each task's fit."""
        if self.weights is None:
            raise RuntimeError("LinearFeatureBaseline.predict: call fit first")
        x = self.features(observations)
        return np.einsum("t...f,tf->t...", x, self.weights)
