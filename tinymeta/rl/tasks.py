"""Vectorized task families: the interface every meta-RL environment implements.

A *task family* is a distribution over tasks (a navigation goal, a running direction)
together with an environment that steps **all episodes of a meta-batch at once**:
``T`` tasks x ``R`` rollouts per task, as arrays of shape ``(T, R, ...)``. Nothing
here imports the autograd engine; environments are plain NumPy.

    family = make_task_family("navigation")               # or "cheetah-dir"
    tasks = family.sample_tasks(20, rng)                    # (20, task_dim)
    obs, info = family.reset(tasks, rollouts_per_task=20, seed=0)   # (20, 20, obs_dim)
    while True:
        obs, reward, terminated, truncated, info = family.step(actions)  # actions (20, 20, 2)
        if (terminated | truncated).all():
            break

Conventions (Gymnasium's, lifted to a batch of episodes):

- ``reset(tasks, rollouts_per_task, seed=None) -> (obs, info)``. ``tasks`` is the
  ``(T, task_dim)`` array that ``sample_tasks`` returns (a ``(task_dim,)`` vector is
  not accepted: one task is ``tasks[None]``). Every task parameter is checked
  (``check_tasks``): one outside the family raises ``ValueError`` naming it. ``seed``
  seeds the family's own generator (initial-state noise, if the environment has any);
  ``seed=None`` continues from the current generator; a ``PerTaskGenerators`` (one
  generator per task) draws each task's initial states from its own generator, for this
  reset only, so that a task's episodes do not depend on the tasks beside it. Same
  ``seed``, same tasks and same actions give bit-identical observations and rewards.
- ``step(actions) -> (obs, reward, terminated, truncated, info)`` with ``actions`` of
  shape ``(T, R, action_dim)`` (any float dtype). A wrong shape, or a NaN/inf entry,
  raises ``ValueError`` naming the expected shape / the first bad index. Actions are
  clipped to ``[action_low, action_high]`` by the environment (a Gaussian policy's
  samples are unbounded). Returns ``obs`` float64 ``(T, R, observation_dim)``,
  ``reward`` float64 ``(T, R)``, ``terminated`` and ``truncated`` bool ``(T, R)``,
  and ``info`` a dict of ``(T, R, ...)`` arrays (environment-specific; navigation
  gives ``"distance"``, half-cheetah gives ``"x_velocity"``).
- ``terminated``: the episode reached a terminal state at this step (navigation: within
  0.01 of the goal). ``truncated``: it reached ``horizon`` steps without terminating.
- Episodes finish at different times, and there is no auto-reset: once an episode is
  done (terminated or truncated at an earlier step), later ``step`` calls ignore its
  actions, repeat its last observation, give it reward 0 and repeat its flags. A sampler
  therefore keeps ``alive = ~(terminated | truncated)`` from the *previous* step as
  the mask of valid transitions. After ``horizon`` steps every episode is done; a
  further ``step`` raises ``RuntimeError`` (call ``reset``).
- ``normalized_actions`` (``make_task_family(..., normalized_actions=True)``): the policy
  acts in [-1, 1] and the family maps each coordinate linearly onto
  ``[action_low, action_high]`` before clipping, as rllab's ``normalize`` wrapper does in
  MAML's code (navigation: velocity = 0.1 * action; identity where the bounds are
  [-1, 1]). Then a unit-variance Gaussian policy explores at the scale of the actions.
- ``oracle=True`` appends the task parameter to every observation
  (``observation_dim = base_observation_dim + task_dim``): the oracle baseline's
  policy sees its goal / direction.

Implementing a family: subclass ``TaskFamily``, set the class attributes ``name``,
``task_dim``, ``base_observation_dim``, ``action_dim``, ``action_low``, ``action_high``,
``default_horizon``, and write ``sample_tasks``, ``check_tasks``, ``_reset`` and
``_step`` (see their docstrings). The base class does the validation, clipping,
done-freezing, truncation and oracle observations, so those behave the same in every
family. Register the family in ``_FAMILIES`` below.
"""

from __future__ import annotations

import importlib

import numpy as np


def as_generator(rng) -> np.random.Generator:
    """``None`` / an int seed / a ``numpy.random.Generator`` (returned as is) -> a Generator."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be None, an int seed or a numpy Generator, got {type(rng).__name__}")


class PerTaskGenerators:
    """Generators, one per task, drawing as one: ``standard_normal(shape)`` and
    ``uniform(size=shape)`` give row t of the leading (task) axis from generator t. A task's
    episodes then depend only on its own generator, not on which tasks are sampled with it
    (the same rollouts whichever rank of a distributed run samples the task)."""

    def __init__(self, generators):
        self.generators = [np.random.default_rng(g) for g in generators]

    def __len__(self) -> int:
        return len(self.generators)

    def _rows(self, draw, shape) -> np.ndarray:
        shape = tuple(shape)
        if not shape or shape[0] != len(self.generators):
            raise ValueError(
                f"PerTaskGenerators: the leading axis of {shape} must be the "
                f"{len(self.generators)} tasks"
            )
        return np.stack([draw(g, shape[1:]) for g in self.generators])

    def standard_normal(self, size=None) -> np.ndarray:
        return self._rows(lambda g, s: g.standard_normal(s), size)

    def uniform(self, low=0.0, high=1.0, size=None) -> np.ndarray:
        return self._rows(lambda g, s: g.uniform(low, high, s), size)

    def integers(self, low, high=None, size=None) -> np.ndarray:
        return self._rows(lambda g, s: g.integers(low, high, s), size)


class TaskFamily:
    """A distribution over tasks plus a vectorized environment for ``(T, R)`` episodes.

    Constructor keywords (every family accepts these two, and may add its own):
    ``horizon`` (steps per episode; default ``default_horizon``) and ``oracle``
    (append the task parameter to the observation).
    """

    name: str = ""
    task_dim: int = 0
    base_observation_dim: int = 0
    action_dim: int = 0
    action_low: float = -np.inf
    action_high: float = np.inf
    default_horizon: int = 0
    normalized_actions: bool = False

    def __init__(self, horizon: int | None = None, oracle: bool = False):
        horizon = self.default_horizon if horizon is None else horizon
        if not isinstance(horizon, (int, np.integer)) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError(f"{self.name}: horizon must be a positive int, got {horizon!r}")
        self.horizon = int(horizon)
        self.oracle = bool(oracle)
        self._rng = np.random.default_rng()
        self._tasks = None

    @property
    def observation_dim(self) -> int:
        return self.base_observation_dim + (self.task_dim if self.oracle else 0)

    # --- to implement ---------------------------------------------------------------------

    def sample_tasks(self, n: int, rng=None) -> np.ndarray:
        """``n`` tasks drawn from the family's task distribution, ``(n, task_dim)`` float64.

        ``rng`` is ``None``, an int seed or a ``numpy.random.Generator``: the same seed gives
        the same tasks.
        """
        raise NotImplementedError

    def check_tasks(self, tasks) -> np.ndarray:
        """``tasks`` as a ``(T, task_dim)`` float64 array, or ``ValueError`` naming the first
        task parameter that is not in the family (wrong shape, NaN, out of range)."""
        raise NotImplementedError

    def _reset(self, tasks: np.ndarray, rollouts_per_task: int, rng: np.random.Generator):
        """Start ``(T, R)`` episodes; return the base observation ``(T, R, base_observation_dim)``
        and an info dict. ``rng`` is the family's seeded generator (initial-state noise)."""
        raise NotImplementedError

    def _step(self, actions: np.ndarray):
        """Advance *every* episode by one step with already-clipped float64 ``actions``
        ``(T, R, action_dim)``; return ``(base_obs, reward, terminated, info)``. The base class
        discards the results of episodes that were already done, so ``_step`` need not mask."""
        raise NotImplementedError

    # --- shared behaviour -----------------------------------------------------------------

    def reset(self, tasks, rollouts_per_task: int, seed=None):
        """Start ``rollouts_per_task`` episodes of every task; returns ``(obs, info)``."""
        tasks = self.check_tasks(tasks)
        if (
            not isinstance(rollouts_per_task, (int, np.integer))
            or isinstance(rollouts_per_task, bool)
            or rollouts_per_task < 1
        ):
            raise ValueError(
                f"{self.name}.reset: rollouts_per_task must be a positive int, "
                f"got {rollouts_per_task!r}"
            )
        rng = self._rng
        if isinstance(seed, PerTaskGenerators):  # this reset only: one generator per task
            if len(seed) != len(tasks):
                raise ValueError(
                    f"{self.name}.reset: {len(seed)} per-task generators for {len(tasks)} tasks"
                )
            rng = seed
        elif seed is not None:
            self._rng = rng = as_generator(seed)
        self._tasks = tasks
        self._t = 0
        shape = (len(tasks), int(rollouts_per_task))
        base_obs, info = self._reset(tasks, int(rollouts_per_task), rng)
        self._last_obs = np.asarray(base_obs, dtype=np.float64)
        self._terminated = np.zeros(shape, dtype=bool)
        self._truncated = np.zeros(shape, dtype=bool)
        return self._observe(self._last_obs), info

    def step(self, actions):
        """One step of every episode; returns ``(obs, reward, terminated, truncated, info)``."""
        if self._tasks is None:
            raise RuntimeError(f"{self.name}.step: call reset(tasks, rollouts_per_task) first")
        if self._t >= self.horizon:
            raise RuntimeError(
                f"{self.name}.step: all episodes ended at the horizon ({self.horizon}); call reset"
            )
        actions = self._check_actions(actions)
        done_before = self._terminated | self._truncated
        if self.normalized_actions:  # [-1, 1] -> [low, high]
            actions = self.action_low + (actions + 1.0) * 0.5 * (self.action_high - self.action_low)
        base_obs, reward, terminated, info = self._step(
            np.clip(actions, self.action_low, self.action_high)
        )
        self._t += 1
        base_obs = np.where(done_before[..., None], self._last_obs, base_obs)
        reward = np.where(done_before, 0.0, np.asarray(reward, dtype=np.float64))
        self._terminated = self._terminated | (np.asarray(terminated, dtype=bool) & ~done_before)
        if self._t >= self.horizon:
            self._truncated = self._truncated | ~self._terminated
        self._last_obs = base_obs
        return (
            self._observe(base_obs),
            reward,
            self._terminated.copy(),
            self._truncated.copy(),
            info,
        )

    def _observe(self, base_obs: np.ndarray) -> np.ndarray:
        if not self.oracle:
            return base_obs
        task = np.broadcast_to(self._tasks[:, None, :], base_obs.shape[:2] + (self.task_dim,))
        return np.concatenate([base_obs, task], axis=-1)

    def _check_actions(self, actions) -> np.ndarray:
        actions = np.asarray(actions)
        expected = self._terminated.shape + (self.action_dim,)
        if actions.shape != expected:
            raise ValueError(
                f"{self.name}.step: actions must have shape (tasks, rollouts, action_dim) = "
                f"{expected}, got {actions.shape}"
            )
        if not np.issubdtype(actions.dtype, np.number):
            raise ValueError(f"{self.name}.step: actions must be numbers, got {actions.dtype}")
        actions = actions.astype(np.float64)
        bad = ~np.isfinite(actions)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{self.name}.step: actions contain NaN or inf (first at index {index})"
            )
        return actions


# name -> (module, class). Modules are imported on first use, so a family whose extra
# (gymnasium + mujoco for "cheetah-dir") is missing costs nothing until it is asked for.
_FAMILIES = {
    "navigation": ("tinymeta.rl.navigation", "Navigation2D"),
    "cheetah-dir": ("tinymeta.rl.gym_tasks", "HalfCheetahDirection"),
}


def task_family_names() -> list[str]:
    return sorted(_FAMILIES)


def make_task_family(name: str, normalized_actions: bool = False, **kwargs) -> TaskFamily:
    """The task family called ``name`` (``"navigation"``, ``"cheetah-dir"``), built with
    ``kwargs`` (``horizon=``, ``oracle=``, and the family's own), acting in [-1, 1] with
    ``normalized_actions=True``. A family that needs an optional extra raises
    ``ImportError`` saying which ``pip install`` provides it."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown task family {name!r}; known: {task_family_names()}")
    module_name, class_name = _FAMILIES[name]
    module = importlib.import_module(module_name)
    family = getattr(module, class_name)(**kwargs)
    family.normalized_actions = bool(normalized_actions)
    return family
