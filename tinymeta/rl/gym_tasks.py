"""A Gymnasium environment plus a task parameter, as a vectorized task family.

``GymTaskFamily`` turns any Gymnasium environment id into a ``TaskFamily``: each of the
``T x R`` episodes of a meta-batch gets its own environment instance (simulators such as
MuJoCo keep one state per episode), all of them are stepped together by one ``step`` call,
and the task decides the reward through ``task_reward(tasks, obs, actions, info)``, a
vectorized function of the ``(T, task_dim)`` task parameters and the ``(T, R, ...)``
observations, clipped actions and the environment's per-step ``info`` values. The
environment's own reward is ignored.

``HalfCheetahDirection`` is the half-cheetah direction task of MAML (Finn et al. 2017,
section 5.3) on Gymnasium's ``HalfCheetah-v5``: a task is a direction ``d`` in {+1, -1},
drawn uniformly, and the reward per step is

    r = d * v_x - 0.5 * 0.1 * |a|^2,

with ``v_x`` the forward velocity Gymnasium reports (``info["x_velocity"]``, the finite
difference of the root's x position over one control step, dt = 0.05 s) and ``a`` the action
clipped to [-1, 1]^6. The control cost is the one of MAML's rllab environment
(``1e-1 * 0.5 * sum(square(clip(a)))``); its forward term used the torso's centre-of-mass
velocity and its observation also held the torso's position, where this one keeps
Gymnasium's 17-dimensional observation (joint positions without the root's x, and
velocities). The horizon is the paper's 200 steps.

Gymnasium with MuJoCo is an optional extra: ``pip install -e ".[rl]"``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import numpy as np

from tinymeta.rl.tasks import TaskFamily, as_generator

_INSTALL_HINT = 'pip install -e ".[rl]"  (Gymnasium with MuJoCo)'


def _import_gymnasium():
    try:
        import gymnasium
    except ImportError as exc:
        raise ImportError(
            f"tinymeta.rl.gym_tasks needs gymnasium, which is not installed: {_INSTALL_HINT}"
        ) from exc
    return gymnasium


@contextlib.contextmanager
def _mujoco_warnings_as_python_warnings():
    """Route MuJoCo's warnings (printed and appended to ``MUJOCO_LOG.TXT`` in the working
    directory by default) to Python's ``warnings`` while environments are built.

    A deprecation (Gymnasium's own HalfCheetah model still uses a compiler attribute that
    MuJoCo 4 deprecates) becomes a DeprecationWarning, which Python shows to the developers of
    the code that triggers it and not to every user of a training script; others stay
    RuntimeWarnings."""
    try:
        import mujoco
    except ImportError:
        yield
        return
    messages: list[str] = []
    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(messages.append)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)
        for message in dict.fromkeys(messages):
            category = DeprecationWarning if "deprecated" in message else RuntimeWarning
            warnings.warn(f"MuJoCo: {message}", category, stacklevel=4)


def _positive_int(value, what: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


class GymTaskFamily(TaskFamily):
    """A Gymnasium environment id plus a task parameter -> a task family of ``(T, R)`` episodes.

    Arguments:
        env_id: a registered Gymnasium id (``"HalfCheetah-v5"``) with a ``Box`` observation
            and action space.
        task_dim: length of a task parameter.
        sample_tasks: ``(n, rng) -> (n, task_dim)`` array, ``rng`` a ``numpy`` Generator.
        valid_tasks: ``(T, task_dim) array -> (T,) bool``, False for a parameter outside the
            family; ``task_rule`` says in words what a valid one is (used in the error).
        task_reward: ``(tasks (T, task_dim), obs (T, R, obs_dim), actions (T, R, act_dim),
            info {key: (T, R) array}) -> (T, R)`` reward, with the actions as clipped to the
            action space and the observation after the step.
        name: the family's name in messages.
        default_horizon: the family's episode length (default: the environment's registered
            ``max_episode_steps``); ``horizon`` overrides it.
        oracle: append the task parameter to the observation.
        env_kwargs: keyword arguments for ``gymnasium.make``.

    Every episode has its own unwrapped environment (the time limit, order and passive
    checks of ``gymnasium.make``'s wrappers are the base class's job here); ``step`` runs them
    one after the other and skips the episodes that have ended. ``info`` holds the
    environment's scalar numeric ``info`` entries as ``(T, R)`` float64 arrays (0 for ended
    episodes). ``reset(seed=s)`` seeds each episode's environment with an integer drawn from
    the family's generator, so a seed fixes every initial state.
    """

    def __init__(
        self,
        env_id: str,
        *,
        task_dim: int,
        sample_tasks: Callable[[int, np.random.Generator], np.ndarray],
        valid_tasks: Callable[[np.ndarray], np.ndarray],
        task_rule: str,
        task_reward: Callable[..., np.ndarray],
        name: str | None = None,
        default_horizon: int | None = None,
        horizon: int | None = None,
        oracle: bool = False,
        env_kwargs: dict | None = None,
    ):
        gymnasium = _import_gymnasium()
        self._gymnasium = gymnasium
        self.env_id = env_id
        self.name = name or env_id
        self._env_kwargs = dict(env_kwargs or {})
        self._envs: list = []
        self._info_keys: list[str] = []
        probe = self._make_env()
        obs_space, act_space = probe.observation_space, probe.action_space
        box = gymnasium.spaces.Box
        if not isinstance(obs_space, box) or not isinstance(act_space, box):
            raise ValueError(
                f"{self.name}: GymTaskFamily needs Box observation and action spaces, got "
                f"{type(obs_space).__name__} and {type(act_space).__name__}"
            )
        self._envs.append(probe)
        self.task_dim = _positive_int(task_dim, f"{self.name}: task_dim")
        self.base_observation_dim = int(np.prod(obs_space.shape))
        self.action_dim = int(np.prod(act_space.shape))
        if act_space.shape != (self.action_dim,):
            raise ValueError(f"{self.name}: the action space must be 1-D, got {act_space.shape}")
        self.action_low = np.asarray(act_space.low, dtype=np.float64)
        self.action_high = np.asarray(act_space.high, dtype=np.float64)
        if default_horizon is None:
            default_horizon = gymnasium.spec(env_id).max_episode_steps or 0
        self.default_horizon = default_horizon
        self._sample_tasks = sample_tasks
        self._valid_tasks = valid_tasks
        self._task_rule = task_rule
        self._task_reward = task_reward
        super().__init__(horizon=horizon, oracle=oracle)

    def _make_env(self):
        with _mujoco_warnings_as_python_warnings():
            try:
                env = self._gymnasium.make(
                    self.env_id, disable_env_checker=True, **self._env_kwargs
                )
            except self._gymnasium.error.DependencyNotInstalled as exc:
                raise ImportError(
                    f"{self.name}: {self.env_id} needs a simulator that is not installed ({exc}): "
                    f"{_INSTALL_HINT}"
                ) from exc
        return env.unwrapped

    def close(self) -> None:
        """Close every episode's environment."""
        for env in self._envs:
            env.close()
        self._envs = []

    def sample_tasks(self, n: int, rng=None) -> np.ndarray:
        n = _positive_int(n, f"{self.name}.sample_tasks: n")
        tasks = np.asarray(self._sample_tasks(n, as_generator(rng)), dtype=np.float64)
        return tasks.reshape(n, self.task_dim)

    def check_tasks(self, tasks) -> np.ndarray:
        tasks = np.asarray(tasks, dtype=np.float64)
        if tasks.ndim != 2 or tasks.shape[1] != self.task_dim or len(tasks) == 0:
            raise ValueError(
                f"{self.name}: tasks must have shape (T, {self.task_dim}) with T >= 1, "
                f"got {tasks.shape}"
            )
        bad = ~np.isfinite(tasks).all(axis=1)
        bad[~bad] = ~np.asarray(self._valid_tasks(tasks[~bad]), dtype=bool)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"{self.name}: unknown task parameter {tasks[i].tolist()} (task {i}); "
                f"{self._task_rule}"
            )
        return tasks

    def _reset(self, tasks, rollouts_per_task, rng):
        n = len(tasks) * rollouts_per_task
        while len(self._envs) < n:
            self._envs.append(self._make_env())
        seeds = rng.integers(0, 2**31 - 1, size=(len(tasks), rollouts_per_task)).reshape(-1)
        obs = np.empty((n, self.base_observation_dim))
        for i in range(n):
            obs[i] = np.ravel(self._envs[i].reset(seed=int(seeds[i]))[0])
        self._shape = (len(tasks), rollouts_per_task)
        return obs.reshape(self._shape + (-1,)), {}

    def _step(self, actions):
        done = (self._terminated | self._truncated).reshape(-1)
        flat_actions = actions.reshape(-1, self.action_dim)
        n = len(flat_actions)
        obs = self._last_obs.reshape(n, -1).copy()
        terminated = np.zeros(n, dtype=bool)
        infos = {key: np.zeros(n) for key in self._info_keys}
        for i in np.flatnonzero(~done):
            obs_i, _, terminated[i], _, info_i = self._envs[i].step(flat_actions[i])
            obs[i] = np.ravel(obs_i)
            if not self._info_keys:
                self._info_keys = [
                    key
                    for key, value in info_i.items()
                    if np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number)
                ]
                infos = {key: np.zeros(n) for key in self._info_keys}
            for key in self._info_keys:
                infos[key][i] = info_i[key]
        obs = obs.reshape(self._shape + (-1,))
        info = {key: value.reshape(self._shape) for key, value in infos.items()}
        return obs, self._reward_of(obs, actions, info), terminated.reshape(self._shape), info

    def _reward_of(self, obs, actions, info):
        reward = np.asarray(self._task_reward(self._tasks, obs, actions, info), dtype=np.float64)
        if reward.shape != self._shape:
            raise ValueError(
                f"{self.name}: task_reward returned shape {reward.shape}, expected {self._shape}"
            )
        return reward


class HalfCheetahDirection(GymTaskFamily):
    """MAML's half-cheetah direction task: run forward (``+1``) or backward (``-1``).

    A task is ``[d]`` with ``d`` in {+1, -1}; ``sample_tasks`` draws each with probability
    1/2. Reward per step: ``d * info["x_velocity"] - ctrl_cost_weight * |a|^2`` with the
    clipped action ``a`` and ``ctrl_cost_weight = 0.5 * 0.1`` as in MAML's code. Horizon 200.

    ``stepper="mujoco"`` (the default) keeps one ``mujoco.MjData`` per episode on the model
    of one Gymnasium ``HalfCheetah`` environment and advances each by Gymnasium's
    ``frame_skip`` physics steps, computing the observation (joint positions without the
    root's x, then velocities) and ``x_velocity`` for the whole batch as arrays; episodes
    start from states drawn by that environment's own ``reset``. It gives bit-identical
    observations and rewards to ``stepper="gymnasium"`` (one full Gymnasium environment per
    episode, the generic path of ``GymTaskFamily``) without the per-call overhead of
    ``env.step``. ``info`` holds ``x_position`` and ``x_velocity``.
    """

    ctrl_cost_weight = 0.5 * 0.1

    def __init__(
        self,
        horizon: int | None = None,
        oracle: bool = False,
        stepper: str = "mujoco",
        env_id: str = "HalfCheetah-v5",
    ):
        if stepper not in ("mujoco", "gymnasium"):
            raise ValueError(
                f"cheetah-dir: stepper must be 'mujoco' or 'gymnasium', got {stepper!r}"
            )
        try:
            import mujoco
        except ImportError as exc:
            raise ImportError(
                f"cheetah-dir needs mujoco, which is not installed: {_INSTALL_HINT}"
            ) from exc
        super().__init__(
            env_id,
            task_dim=1,
            sample_tasks=self._directions,
            valid_tasks=lambda tasks: np.abs(tasks[:, 0]) == 1.0,
            task_rule="a direction is +1 (forward) or -1 (backward)",
            task_reward=self._direction_reward,
            name="cheetah-dir",
            default_horizon=200,
            horizon=horizon,
            oracle=oracle,
        )
        self.stepper = stepper
        if stepper == "mujoco":
            self._mujoco = mujoco
            env = self._envs[0]
            self._model = env.model
            self._frame_skip = int(env.frame_skip)
            self._dt = float(env.dt)
            self._datas: list = []
            expected = self._model.nq - 1 + self._model.nv
            if self.base_observation_dim != expected:
                raise ValueError(
                    f"cheetah-dir: stepper='mujoco' builds the observation (qpos[1:], qvel) of "
                    f"{expected} values, but {env_id} observes {self.base_observation_dim}"
                )

    @staticmethod
    def _directions(n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(np.array([-1.0, 1.0]), size=(n, 1))

    def _direction_reward(self, tasks, obs, actions, info):
        forward = tasks[:, None, 0] * info["x_velocity"]
        return forward - self.ctrl_cost_weight * np.sum(actions**2, axis=-1)

    def _reset(self, tasks, rollouts_per_task, rng):
        if self.stepper == "gymnasium":
            return super()._reset(tasks, rollouts_per_task, rng)
        mujoco, model, env = self._mujoco, self._model, self._envs[0]
        n = len(tasks) * rollouts_per_task
        while len(self._datas) < n:
            self._datas.append(mujoco.MjData(model))
        # The same seed draws as the Gymnasium path, so both start from the same states.
        seeds = rng.integers(0, 2**31 - 1, size=(len(tasks), rollouts_per_task)).reshape(-1)
        self._qpos = np.empty((n, model.nq))
        self._qvel = np.empty((n, model.nv))
        for i in range(n):
            env.reset(seed=int(seeds[i]))
            mujoco.mj_copyData(self._datas[i], model, env.data)
            self._qpos[i] = env.data.qpos
            self._qvel[i] = env.data.qvel
        self._shape = (len(tasks), rollouts_per_task)
        return self._observation(), {}

    def _observation(self) -> np.ndarray:
        obs = np.concatenate([self._qpos[:, 1:], self._qvel], axis=1)
        return obs.reshape(self._shape + (-1,))

    def _step(self, actions):
        if self.stepper == "gymnasium":
            return super()._step(actions)
        mujoco, model, frame_skip = self._mujoco, self._model, self._frame_skip
        alive = np.flatnonzero(~(self._terminated | self._truncated).reshape(-1))
        flat_actions = actions.reshape(-1, self.action_dim)
        x_before = self._qpos[:, 0].copy()
        for i in alive:
            data = self._datas[i]
            data.ctrl[:] = flat_actions[i]
            mujoco.mj_step(model, data, nstep=frame_skip)
            self._qpos[i] = data.qpos
            self._qvel[i] = data.qvel
        x_velocity = (self._qpos[:, 0] - x_before) / self._dt
        info = {
            "x_position": self._qpos[:, 0].reshape(self._shape),
            "x_velocity": x_velocity.reshape(self._shape),
        }
        obs = self._observation()
        terminated = np.zeros(self._shape, dtype=bool)
        return obs, self._reward_of(obs, actions, info), terminated, info
