"""learn2learn-style convenience on top of the functional core:

    maml = MAML(model, lr=0.01)
    learner = maml.clone()          # a view of the model's parameters, nothing copied
    learner.adapt(loss_fn(learner(xs), ys))
    meta_loss = loss_fn(learner(xq), yq)
    meta_loss.backward()            # gradients reach model's parameters (and the rule's)

A learner holds a params dict and runs the model through
``nn.functional_call``; ``adapt`` replaces the dict by the updated one. The
model itself is never modified.
"""

from __future__ import annotations

from tinymeta.autograd import grad
from tinymeta.meta.inner_rules import as_update_rule
from tinymeta.nn.inner_step import inner_step


class MAML:
    """Wraps ``model`` and an inner update ``rule`` (a learning rate or a rule object).

    ``first_order=True`` gives FOMAML; ``keys`` restricts adaptation to some
    parameters (ANIL: the head's).
    """

    def __init__(self, model, lr=0.01, first_order: bool = False, keys=None):
        self.model = model
        self.rule = as_update_rule(lr)
        self.first_order = first_order
        self.keys = None if keys is None else list(keys)

    def parameters(self) -> list:
        """Meta-parameters: the model's and the update rule's (learned rates, ...)."""
        return list(self.model.parameters()) + list(self.rule.parameters())

    def clone(self) -> Learner:
        return Learner(self, dict(self.model.named_parameters()))

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class Learner:
    """One task's copy of the parameters, updated functionally by ``adapt``."""

    def __init__(self, maml: MAML, params: dict):
        self.maml = maml
        self.params = params
        self.steps_taken = 0
        self.rule_state: dict = {}  # the update rule's memory for this learner alone

    def __call__(self, *args, **kwargs):
        from tinymeta.nn import functional_call

        # The forward of parameters updated k times is inner step k (per-step BatchNorm).
        with inner_step(self.steps_taken):
            return functional_call(self.maml.model, self.params, *args, **kwargs)

    def adapt(self, loss, first_order: bool | None = None) -> Learner:
        """One inner step on ``loss`` (a scalar computed with this learner)."""
        first_order = self.maml.first_order if first_order is None else first_order
        keys = self.maml.keys or list(self.params)
        gs = grad(
            loss, [self.params[k] for k in keys], create_graph=not first_order, allow_unused=True
        )
        unused = [k for k, g in zip(keys, gs) if g is None]
        if unused:
            raise RuntimeError(
                f"adapt: the loss does not depend on parameters {unused}; compute it with "
                "this learner (learner(x)), or restrict adaptation with MAML(keys=...)"
            )
        updated = self.maml.rule(
            {k: self.params[k] for k in keys}, dict(zip(keys, gs)), self.steps_taken,
            self.rule_state,
        )  # fmt: skip
        self.params = {**self.params, **updated}
        self.steps_taken += 1
        return self

    def clone(self) -> Learner:
        other = Learner(self.maml, dict(self.params))
        other.steps_taken = self.steps_taken
        other.rule_state = dict(self.rule_state)
        return other
