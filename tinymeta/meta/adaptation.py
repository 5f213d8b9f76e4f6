"""MAML's inner loop and meta-objective, as pure functions of parameter dicts.

    adapted = adapt(support_loss, params, rule, steps)      # params -> params
    meta_loss = query_loss(adapted)                          # differentiable in params

Nothing is mutated or cloned: each inner step builds new tensors from the old
ones, so the meta-gradient flows from the query loss back through every inner
update to the initial parameters. With ``first_order=False`` the inner
gradients are taken with ``create_graph=True``, so the meta-gradient includes
the second-order terms (the Hessian-vector products of true MAML); with
``first_order=True`` they are constants (FOMAML).
"""

from __future__ import annotations

from tinymeta._checks import check_int
from tinymeta.autograd import grad
from tinymeta.meta.inner_rules import as_update_rule
from tinymeta.nn.inner_step import inner_step
from tinymeta.ops import broadcast_to, stack
from tinymeta.tensor import Tensor


def adapt(
    loss_fn,
    params: dict,
    rule=0.01,
    steps: int = 1,
    first_order: bool = False,
    keys=None,
    trajectory: bool = False,
):
    """Take ``steps`` inner updates of ``params`` on ``loss_fn(params) -> scalar``.

    ``rule`` is a learning rate or an update rule (see inner_rules); ``keys``
    limits adaptation to some parameters (ANIL adapts only the head). Returns
    the adapted dict, or with ``trajectory=True`` the list of dicts after
    0, 1, ..., steps updates.
    """
    rule = as_update_rule(rule)
    steps = check_int("steps", steps, "adapt", low=0)
    keys = list(params) if keys is None else list(keys)
    missing = [k for k in keys if k not in params]
    if missing:
        raise KeyError(f"adapt: keys {missing} are not parameters; known: {sorted(params)}")
    current = dict(params)
    path = [current]
    state: dict = {}  # the rule's memory for this inner loop only
    for step in range(steps):
        with inner_step(step):  # per-step BatchNorm statistics read the step from here
            loss = loss_fn(current)
        gs = grad(loss, [current[k] for k in keys], create_graph=not first_order)
        updated = rule({k: current[k] for k in keys}, dict(zip(keys, gs)), step, state)
        current = {**current, **updated}
        path.append(current)
    return path if trajectory else current


def per_task(params: dict, num_tasks: int, keys=None) -> dict:
    """Copies of ``params`` along a new leading task axis (differentiably: the
    backward of a broadcast sums the per-task gradients back into the meta-parameters).

    Only ``keys`` get a task axis; the others stay shared, which matmul
    broadcasting handles (ANIL's frozen body, say).
    """
    num_tasks = check_int("num_tasks", num_tasks, "per_task", low=1)
    keys = set(params if keys is None else keys)
    return {
        k: broadcast_to(p, (num_tasks,) + p.shape) if k in keys else p  # prepends the axis
        for k, p in params.items()
    }


def maml_loss(
    forward,
    params: dict,
    support: tuple,
    query: tuple,
    loss_fn,
    rule=0.01,
    steps: int = 1,
    first_order: bool = False,
    keys=None,
    vectorized: bool = True,
    step_weights=None,
    return_predictions: bool = False,
):
    """The MAML meta-objective of a meta-batch: the mean over tasks of each task's
    query loss after ``steps`` inner updates on its support set.

    ``forward(params, x)`` is the model as a function of a params dict;
    ``support = (xs, ys)`` and ``query = (xq, yq)`` have a leading task axis;
    ``loss_fn(prediction, target)`` is a mean over examples.

    ``vectorized=True`` runs all tasks as one batched computation: the
    parameters get a task axis (``per_task``), and since tasks are
    independent, the gradient of the *sum* of the tasks' support losses w.r.t.
    the per-task copies is each task's own gradient. The mean over all
    T*n examples times T is that sum. ``vectorized=False`` loops over tasks;
    both give the same meta-gradient.

    ``step_weights`` (one weight per inner step) gives MAML++'s multi-step
    loss: the weighted sum of the query losses after every inner step.

    ``return_predictions=True`` returns ``(loss, predictions)``: the query predictions
    ``forward(adapted, xq)`` after the last inner step, stacked by task (leading axis T) in
    both modes, and part of the same graph as the loss.
    """
    xs, ys = support
    xq, yq = query
    num_tasks = len(xs)
    weights = _step_weights(step_weights, steps)
    rule = as_update_rule(rule)  # once, not once per task (a learning rate becomes a rule)
    if vectorized:
        task_params = per_task(params, num_tasks, keys)
        path = adapt(
            lambda p: loss_fn(forward(p, xs), ys) * num_tasks,
            task_params, rule, steps, first_order, keys, trajectory=True,
        )  # fmt: skip
        loss, predictions = _query_loss(forward, loss_fn, xq, yq, path, weights, return_predictions)
        return (loss, predictions) if return_predictions else loss
    total, predictions = None, []
    for t in range(num_tasks):
        path = adapt(
            lambda p, t=t: loss_fn(forward(p, xs[t]), ys[t]),
            params, rule, steps, first_order, keys, trajectory=True,
        )  # fmt: skip
        loss, task_predictions = _query_loss(
            forward, loss_fn, xq[t], yq[t], path, weights, return_predictions
        )
        total = loss if total is None else total + loss
        predictions.append(task_predictions)
    loss = total * (1.0 / num_tasks)
    return (loss, stack(predictions)) if return_predictions else loss


def _step_weights(step_weights, steps: int) -> list:
    steps = check_int("steps", steps, "maml_loss", low=1)
    if step_weights is None:
        return [0.0] * (steps - 1) + [1.0]
    weights = [float(w) for w in step_weights]
    if len(weights) != steps:
        raise ValueError(
            f"step_weights: need one weight per inner step ({steps}), got {len(weights)}"
        )
    if not any(weights):
        raise ValueError("step_weights: at least one weight must be nonzero")
    return weights


def _query_loss(forward, loss_fn, x, y, path: list, weights: list, predict: bool) -> tuple:
    """(the weighted sum of the query losses after each inner step, the predictions after the
    last one, or None unless ``predict``): each forward runs as its inner step, as the support
    forwards do; a step of weight 0 runs none unless it is the last and ``predict``."""
    total = predictions = None
    last = len(path) - 1
    for step, (p, w) in enumerate(zip(path[1:], weights), start=1):
        if w == 0.0 and not (predict and step == last):
            continue
        with inner_step(step):
            predictions = forward(p, x)
            if w != 0.0:
                loss = loss_fn(predictions, y)
                if w != 1.0:  # (x * 1.0 is x: no node for it, here and in every backward)
                    loss = loss * w
                total = loss if total is None else total + loss
    return total, predictions


def annealed_step_weights(steps: int, iteration: int, anneal_iterations: int) -> list:
    """MAML++'s multi-step loss weights: uniform at first, then all on the last step.

    Over ``anneal_iterations`` the weight of each earlier step decays linearly
    to a small floor and the last step takes the rest (the weights sum to 1).
    """
    steps = check_int("steps", steps, "annealed_step_weights", low=1)
    iteration = check_int("iteration", iteration, "annealed_step_weights", low=0)
    anneal_iterations = check_int(
        "anneal_iterations", anneal_iterations, "annealed_step_weights", low=0
    )
    if steps == 1:
        return [1.0]
    progress = min(iteration / max(anneal_iterations, 1), 1.0)
    floor = 0.03 / steps
    early = max((1.0 / steps) * (1 - progress), floor)
    return [early] * (steps - 1) + [1.0 - early * (steps - 1)]


def reptile_grads(
    forward,
    params: dict,
    support: tuple,
    loss_fn,
    rule=0.01,
    steps: int = 5,
    vectorized: bool = True,
) -> dict:
    """Reptile's meta-gradient (Nichol et al. 2018): params - mean over tasks of the
    parameters after ``steps`` first-order inner updates on each task.

    Hand it to any optimizer (``p.grad = g``): with SGD at rate eps this is
    exactly Reptile's update params += eps * (mean adapted - params).
    """
    xs, ys = support
    num_tasks = len(xs)
    if vectorized:
        adapted = adapt(
            lambda p: loss_fn(forward(p, xs), ys) * num_tasks,
            per_task(params, num_tasks), rule, steps, first_order=True,
        )  # fmt: skip
        return {k: Tensor._wrap(params[k].data - adapted[k].data.mean(axis=0)) for k in params}
    sums = {k: 0.0 for k in params}
    for t in range(num_tasks):
        adapted = adapt(
            lambda p, t=t: loss_fn(forward(p, xs[t]), ys[t]), params, rule, steps, first_order=True
        )
        for k in params:
            sums[k] = sums[k] + adapted[k].data
    return {k: Tensor._wrap(params[k].data - sums[k] / num_tasks) for k in params}
