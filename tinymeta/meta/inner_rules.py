"""Inner-loop update rules: how a base learner's parameters change on a task.

An update rule maps (params, grads, step, state) to new params, all dicts of
tensors, and never mutates its inputs. ``state`` is a dict that belongs to one
adaptation (one task's inner loop): rules with memory (the learned optimizer)
keep it there, so that two learners sharing a rule never share memory.

A rule's own meta-parameters (learning rates, a learned optimizer's weights)
are returned by ``parameters()`` so the outer optimizer can train them: the
meta-gradient reaches them through the inner updates, like it reaches the
initial parameters in MAML.

Every rule works on parameters with a leading task axis too (the learning
rates broadcast over it), which is what task-vectorized meta-batches use.
"""

from __future__ import annotations

import numbers

import numpy as np

from tinymeta._checks import check_int, check_positive
from tinymeta.creation import tensor
from tinymeta.ops.arithmetic import add_scaled


class InnerSGD:
    """p' = p - lr * g with a fixed learning rate (MAML's inner step)."""

    def __init__(self, lr: float):
        self.lr = check_positive("lr", lr, "InnerSGD")

    def __call__(self, params: dict, grads: dict, step: int, state: dict) -> dict:
        return {k: add_scaled(params[k], grads[k], -self.lr) for k in grads}

    def parameters(self) -> list:
        return []

    def named_parameters(self) -> dict:
        return {}


class MetaSGD:
    """p' = p - alpha ⊙ g with one meta-learned rate per parameter entry (Li et al. 2017)."""

    def __init__(self, params: dict, init_lr: float = 0.01, dtype=None):
        init_lr = check_positive("init_lr", init_lr, "MetaSGD")
        self.lrs = {
            k: tensor(
                np.full(p.shape, init_lr),
                dtype=dtype or p.dtype,
                device=p.device,
                requires_grad=True,
            )
            for k, p in params.items()
        }
        for k, lr in self.lrs.items():
            lr.name = f"lr.{k}"

    def __call__(self, params: dict, grads: dict, step: int, state: dict) -> dict:
        return {k: params[k] - self.lrs[k] * grads[k] for k in grads}

    def parameters(self) -> list:
        return list(self.lrs.values())

    def named_parameters(self) -> dict:
        return {f"lr.{k}": v for k, v in self.lrs.items()}


class PerStepLR:
    """p' = p - lr[step][name] * g: one learned scalar rate per tensor and inner step
    (MAML++'s "LSLR", Antoniou et al. 2019)."""

    def __init__(self, params: dict, steps: int, init_lr: float = 0.01, dtype=None):
        self.steps = check_int("steps", steps, "PerStepLR", low=1)
        init_lr = check_positive("init_lr", init_lr, "PerStepLR")
        self.lrs = [
            {
                k: tensor(init_lr, dtype=dtype or p.dtype, device=p.device, requires_grad=True)
                for k, p in params.items()
            }
            for _ in range(steps)
        ]

    def __call__(self, params: dict, grads: dict, step: int, state: dict) -> dict:
        if step >= self.steps:
            raise IndexError(f"PerStepLR: has rates for {self.steps} steps, asked for step {step}")
        rates = self.lrs[step]
        return {k: params[k] - rates[k] * grads[k] for k in grads}

    def parameters(self) -> list:
        return [lr for rates in self.lrs for lr in rates.values()]

    def named_parameters(self) -> dict:
        return {f"lr.{s}.{k}": v for s, rates in enumerate(self.lrs) for k, v in rates.items()}


def as_update_rule(rule) -> object:
    """A number means plain SGD with that rate (positive and finite; a bool is not a rate);
    anything else must be a callable rule and is used as given."""
    if isinstance(rule, (bool, np.bool_)) or isinstance(rule, numbers.Number):
        return InnerSGD(check_positive("learning rate", rule, "as_update_rule"))
    if not callable(rule):
        raise TypeError(
            f"as_update_rule: the inner update rule must be a learning rate (a number) or a "
            f"callable rule, got {rule!r} ({type(rule).__name__})"
        )
    return rule
