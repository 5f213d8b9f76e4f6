"""Meta-reinforcement learning: vectorized task families, policies, returns, MAML-RL.

    from tinymeta import rl
    family = rl.make_task_family("navigation")          # or "cheetah-dir" (extra `rl`)
    policy = rl.GaussianMLPPolicy(family.observation_dim, family.action_dim)
    params = policy.init_params(0)
    info = rl.meta_trpo_iteration(family, policy, params, family.sample_tasks(20, 0),
                                  rollouts=20, inner_lr=0.1, inner_steps=1, rng=0)

Environments (``tasks``, ``navigation``, ``gym_tasks``) are plain NumPy and import nothing
from the engine; everything else is written with tinymeta's autograd.
"""

from tinymeta.rl.distributions import Categorical, DiagGaussian
from tinymeta.rl.episodes import Episodes, compute_advantages, sample_episodes
from tinymeta.rl.maml_rl import (
    MetaObjective,
    adapt_policy,
    fine_tune_returns,
    meta_adam_iteration,
    meta_trpo_iteration,
    reinforce_loss,
    sample_meta_batch,
)
from tinymeta.rl.policy import CategoricalMLPPolicy, GaussianMLPPolicy
from tinymeta.rl.returns import LinearFeatureBaseline, discounted_returns, gae, normalize
from tinymeta.rl.tasks import PerTaskGenerators, TaskFamily, make_task_family, task_family_names
from tinymeta.rl.trpo import FisherVectorProduct, conjugate_gradient, trpo_step

__all__ = [
    "Categorical",
    "CategoricalMLPPolicy",
    "DiagGaussian",
    "Episodes",
    "FisherVectorProduct",
    "GaussianMLPPolicy",
    "LinearFeatureBaseline",
    "MetaObjective",
    "PerTaskGenerators",
    "TaskFamily",
    "adapt_policy",
    "compute_advantages",
    "conjugate_gradient",
    "discounted_returns",
    "fine_tune_returns",
    "gae",
    "make_task_family",
    "meta_adam_iteration",
    "meta_trpo_iteration",
    "normalize",
    "reinforce_loss",
    "sample_episodes",
    "sample_meta_batch",
    "task_family_names",
    "trpo_step",
]
