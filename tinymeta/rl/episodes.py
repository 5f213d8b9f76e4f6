"""Batches of episodes: sampling all (task, rollout) episodes together, and their advantages.

``sample_episodes`` runs a policy in a task family for ``horizon`` steps; the
``T x R`` episodes advance as one array per step (one batched forward of the policy
for all tasks), so the only Python loop is over time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tinymeta.grad_mode import no_grad
from tinymeta.rl.returns import LinearFeatureBaseline, discounted_returns, gae, normalize
from tinymeta.rl.tasks import PerTaskGenerators
from tinymeta.tensor import Tensor


@dataclass
class Episodes:
    """``T`` tasks x ``R`` rollouts x ``H`` steps of experience (H = the family's horizon).

    ``mask[t, r, h]`` is 1 where step h of the episode happened (0 after it ended);
    ``infos`` holds the environment's per-step info arrays, stacked on the time axis.
    """

    tasks: np.ndarray  # (T, task_dim)
    observations: np.ndarray  # (T, R, H, obs_dim)
    actions: np.ndarray  # (T, R, H, act_dim), or (T, R, H) integers
    rewards: np.ndarray  # (T, R, H)
    mask: np.ndarray  # (T, R, H)
    infos: dict = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return self.rewards.shape[0]

    def returns(self) -> np.ndarray:
        """Undiscounted return of every episode, ``(T, R)``."""
        return (self.rewards * self.mask).sum(axis=-1)

    def task(self, t: int) -> Episodes:
        """The episodes of task ``t`` alone, keeping a task axis of length 1."""
        s = slice(t, t + 1)
        return Episodes(
            self.tasks[s],
            self.observations[s],
            self.actions[s],
            self.rewards[s],
            self.mask[s],
            {k: v[s] for k, v in self.infos.items()},
        )

    def flat(self, dtype=np.float64) -> tuple:
        """``(obs (T, R*H, obs_dim), actions (T, R*H, ...))``: one batch per task, for the
        task-vectorized policy forward."""
        t = self.num_tasks
        obs = self.observations.reshape(t, -1, self.observations.shape[-1]).astype(dtype)
        actions = self.actions.reshape((t, -1) + self.actions.shape[3:])
        if actions.dtype.kind == "f":
            actions = actions.astype(dtype)
        return obs, actions


def sample_episodes(family, policy, params: dict, tasks, rollouts: int, rng, seed=None):
    """Run ``policy`` with ``params`` (shared, or with a task axis of length ``len(tasks)``)
    for ``rollouts`` episodes of each task; actions are drawn with ``rng`` (a generator or
    seed, or a ``PerTaskGenerators`` with one generator per task, which then also draws each
    task's initial states unless ``seed`` fixes them)."""
    if isinstance(rng, PerTaskGenerators):
        if len(rng) != len(tasks):
            raise ValueError(
                f"sample_episodes: {len(rng)} per-task generators for {len(tasks)} tasks"
            )
    else:
        rng = np.random.default_rng(rng)
    if seed is None and isinstance(rng, PerTaskGenerators):
        seed = rng  # each task's initial states from its own generator too
    obs, _ = family.reset(tasks, rollouts, seed=seed)
    tasks = np.asarray(tasks, dtype=np.float64)
    shape = obs.shape[:2]
    dtype = next(iter(params.values())).dtype
    horizon = family.horizon
    observations, actions, rewards, masks = [], [], [], []
    infos: dict = {}
    alive = np.ones(shape)
    with no_grad():
        for _ in range(horizon):
            action = policy(params, Tensor(obs.astype(dtype))).sample(rng)
            next_obs, reward, terminated, truncated, info = family.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward * alive)
            masks.append(alive)
            for k, v in info.items():
                infos.setdefault(k, []).append(v)
            alive = alive * ~(terminated | truncated)
            obs = next_obs
            if not alive.any():
                break
    steps = len(rewards)
    pad = horizon - steps  # every episode ended early: the rest is masked out

    def stack(xs, fill=0.0):
        out = np.stack(xs, axis=2)
        if pad:
            widths = [(0, 0)] * out.ndim
            widths[2] = (0, pad)
            out = np.pad(out, widths, constant_values=fill)
        return out

    return Episodes(
        tasks,
        stack(observations),
        stack(actions),
        stack(rewards),
        stack(masks),
        {k: stack(v) for k, v in infos.items()},
    )


def compute_advantages(
    episodes: Episodes, gamma: float = 0.99, lam: float = 1.0, normalized: bool = True
) -> np.ndarray:
    """GAE(lambda) advantages ``(T, R, H)`` against a linear feature baseline fitted to each
    task's discounted returns, normalised per task (MAML's code does all three)."""
    returns = discounted_returns(episodes.rewards, gamma, episodes.mask)
    baseline = LinearFeatureBaseline().fit(episodes.observations, returns, episodes.mask)
    values = baseline.predict(episodes.observations)
    adv = gae(episodes.rewards, values, gamma, lam, episodes.mask)
    return normalize(adv, episodes.mask, axes=(1, 2)) if normalized else adv
