"""Meta-reinforcement learning: vectorized task families, policies, returns, MAML-RL.

Environments (``tasks``, ``navigation``, ``gym_tasks``) are plain NumPy; everything
else is written with tinymeta's autograd.
"""

from tinymeta.rl.tasks import TaskFamily, make_task_family, task_family_names

__all__ = ["TaskFamily", "make_task_family", "task_family_names"]
