"""Meta-learning: learning how a base learner learns.

Functional core (parameters are dicts of tensors, nothing is mutated):
``adapt`` (the inner loop), ``maml_loss`` (the meta-objective of a meta-batch,
looped or task-vectorized), ``reptile_grads``, ``per_task`` (a task axis).
Inner update rules: ``InnerSGD`` (MAML), ``MetaSGD``, ``PerStepLR`` (MAML++),
``LearnedOptimizer``. Convenience: ``MAML(model).clone().adapt(loss)``.
"""

from tinymeta.meta.adaptation import (
    adapt,
    annealed_step_weights,
    maml_loss,
    per_task,
    reptile_grads,
)
from tinymeta.meta.inner_rules import InnerSGD, MetaSGD, PerStepLR, as_update_rule
from tinymeta.meta.learned_optimizer import LearnedOptimizer
from tinymeta.meta.learner import MAML, Learner
from tinymeta.meta.lstm_optimizer import LSTMOptimizer

__all__ = [
    "MAML",
    "InnerSGD",
    "LSTMOptimizer",
    "LearnedOptimizer",
    "Learner",
    "MetaSGD",
    "PerStepLR",
    "adapt",
    "annealed_step_weights",
    "as_update_rule",
    "maml_loss",
    "per_task",
    "reptile_grads",
]
