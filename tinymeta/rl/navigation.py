"""2D navigation (MAML, Finn et al. 2017, section 5.3), all episodes stepped as arrays.

A point starts at the origin and must reach a goal drawn uniformly from [-0.5, 0.5]^2.
The observation is the position, the action a velocity clipped to [-0.1, 0.1] per
coordinate, the reward minus the Euclidean distance to the goal after the move. An
episode terminates within 0.01 of the goal, or is truncated at the horizon (100).
"""

from __future__ import annotations

import numpy as np

from tinymeta.rl.tasks import TaskFamily, as_generator


class Navigation2D(TaskFamily):
    """Point-mass navigation to a goal; a task is its goal ``(x, y)``."""

    name = "navigation"
    task_dim = 2
    base_observation_dim = 2
    action_dim = 2
    action_low = -0.1
    action_high = 0.1
    default_horizon = 100
    goal_low = -0.5
    goal_high = 0.5
    goal_radius = 0.01  # the episode terminates this close to the goal

    def sample_tasks(self, n: int, rng=None) -> np.ndarray:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"navigation.sample_tasks: n must be a positive int, got {n!r}")
        return as_generator(rng).uniform(self.goal_low, self.goal_high, size=(int(n), 2))

    def check_tasks(self, tasks) -> np.ndarray:
        tasks = np.asarray(tasks, dtype=np.float64)
        if tasks.ndim != 2 or tasks.shape[1] != 2 or len(tasks) == 0:
            raise ValueError(
                f"navigation: tasks must be goals of shape (T, 2) with T >= 1, got {tasks.shape}"
            )
        bad = ~np.isfinite(tasks).all(axis=1) | (np.abs(tasks) > self.goal_high).any(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"navigation: unknown task: goal {i} = {tasks[i].tolist()} is not in "
                f"[{self.goal_low}, {self.goal_high}]^2"
            )
        return tasks

    def _reset(self, tasks, rollouts_per_task, rng):
        self._position = np.zeros((len(tasks), rollouts_per_task, 2))
        return self._position.copy(), {}

    def _step(self, actions):
        self._position = self._position + actions
        distance = np.linalg.norm(self._position - self._tasks[:, None, :], axis=-1)
        return self._position.copy(), -distance, distance < self.goal_radius, {"distance": distance}
