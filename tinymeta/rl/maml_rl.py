"""MAML for policies (Finn et al. 2017, section 5.3): a policy-gradient inner step,
a TRPO (or clipped-surrogate Adam) outer step, all tasks at once.

For each task i of a meta-batch, with meta-parameters theta:

    theta_i' = theta - alpha grad L_i^PG(theta)          (inner: REINFORCE on D_i, sampled
                                                          with theta; one or more steps)
    L_i^surr(theta) = -E_{D_i'}[ pi_{theta_i'}(a|s) / pi_old(a|s) A ]
                                                         (outer: D_i' sampled with theta_i')
    KL_i(theta) = E_{D_i'}[ KL(pi_old(.|s) || pi_{theta_i'}(.|s)) ]

and the outer step lowers mean_i L_i^surr within mean_i KL_i <= max_kl. With
``pre_update_kl=True`` the trust region also holds the pre-update policies: the bound is
on mean_i KL_i plus mean_i E_{D_i}[ KL(pi_old(.|s) || pi_theta(.|s)) ] (D_i: the pre-update
rollouts). Without it, the step can move the pre-update policy far (its change is undone
by the inner step, so the post-update KL does not see it); a policy whose mean then
saturates the action bounds samples pre-update rollouts that teach the inner step little
(ProMP, Rothfuss et al. 2019, adds the same KL, as a penalty, to control the pre-update
policy too). ``inner_loss="lvc"`` differentiates the inner step in ProMP's low-variance
curvature form (``reinforce_loss``): the same step, and a meta-gradient that also credits
the pre-update policy for the rollouts it sampled.

The inner gradient is taken with ``create_graph=True``, so the meta-gradient and the
Fisher-vector products differentiate through it (``first_order=True`` drops that).
Parameters get a leading task axis (``per_task``) and every task's rollouts go
through the policy in one batched forward; ``vectorized=False`` loops over tasks
instead (the same numbers, as the tests check). With several inner steps, every step
reuses the pre-update rollouts D_i.

Data parallelism (examples/maml_rl.py under ``mpiexec``): each process samples and adapts
a share of the meta-batch, ``MetaObjective(total_tasks=B)`` weights its terms by 1/B (so
the shares' sums add up to the mean over all B tasks), and a ``reduce`` callable (a flat
NumPy vector's sum over processes; the identity by default) makes ``trpo_step``, the
Adam option's gradients and the returned statistics those of the whole meta-batch. Give
``sample_meta_batch`` a ``PerTaskGenerators`` for rollouts that do not depend on which
process samples a task. Nothing here imports MPI.
"""

from __future__ import annotations

import numpy as np

from tinymeta.autograd import grad
from tinymeta.meta.adaptation import adapt, per_task
from tinymeta.ops import clip as tclip
from tinymeta.ops import exp, minimum
from tinymeta.ops import sum as tsum
from tinymeta.rl.episodes import Episodes, compute_advantages, sample_episodes
from tinymeta.rl.trpo import flatten, trpo_step, unflatten
from tinymeta.tensor import Tensor


def _step_weights(mask: np.ndarray) -> np.ndarray:
    """Weights that turn a sum over a task's steps into its mean over valid steps."""
    flat = mask.reshape(mask.shape[0], -1)
    return flat / np.maximum(flat.sum(axis=1, keepdims=True), 1.0)


INNER_LOSSES = ("reinforce", "lvc")


def reinforce_loss(
    policy, params: dict, episodes: Episodes, advantages: np.ndarray, form: str = "reinforce"
) -> Tensor:
    """sum over tasks of -mean_{valid steps} log pi(a|s) A  (each task's own vanilla
    policy-gradient loss; summed so that a per-task parameter gets its task's gradient).

    ``form="lvc"``: -mean pi(a|s) / stop_grad(pi(a|s)) A instead, ProMP's low-variance
    curvature objective (Rothfuss et al. 2019). Its gradient is the same, so the inner
    step takes the same values; its second derivative adds sum_t A_t grad log pi_t
    (grad log pi_t)^T, the curvature that comes from the rollouts having been sampled by
    the policy being adapted. Differentiated through, that term credits the pre-update
    policy for sampling rollouts that teach the inner step well, which the
    log-likelihood form leaves out."""
    if form not in INNER_LOSSES:
        raise ValueError(f"reinforce_loss: form must be one of {INNER_LOSSES}, got {form!r}")
    dtype = next(iter(params.values())).dtype
    obs, actions = episodes.flat(dtype)
    weights = (_step_weights(episodes.mask) * advantages.reshape(len(obs), -1)).astype(dtype)
    log_prob = policy(params, obs).log_prob(actions)
    if form == "lvc":
        return -tsum(exp(log_prob - log_prob.detach()) * weights)
    return -tsum(log_prob * weights)


def adapt_policy(
    policy,
    params: dict,
    episodes: Episodes,
    advantages: np.ndarray,
    lr: float,
    steps: int = 1,
    first_order: bool = False,
    inner_loss: str = "reinforce",
) -> dict:
    """Per-task parameters after ``steps`` policy-gradient steps of rate ``lr`` on each
    task's ``episodes``; ``params`` are shared (they get a task axis here). ``inner_loss``:
    the form of ``reinforce_loss`` differentiated through (same values either way)."""
    task_params = per_task(params, episodes.num_tasks)
    if steps == 0:
        return task_params
    return adapt(
        lambda p: reinforce_loss(policy, p, episodes, advantages, inner_loss),
        task_params,
        lr,
        steps,
        first_order=first_order,
    )


class MetaObjective:
    """``(params, create_graph) -> (surrogate loss, mean KL)`` of a meta-batch, for
    ``trpo_step``. The old policy is the one evaluated at the first call (the parameters
    that sampled the post-update rollouts), kept as constants."""

    def __init__(
        self,
        policy,
        train: Episodes | None,
        train_advantages: np.ndarray | None,
        valid: Episodes,
        valid_advantages: np.ndarray,
        inner_lr: float,
        inner_steps: int = 1,
        first_order: bool = False,
        vectorized: bool = True,
        clip: float | None = None,
        fisher: str = "exact",
        total_tasks: int | None = None,
        pre_update_kl: bool = False,
        inner_loss: str = "reinforce",
    ):
        if inner_loss not in INNER_LOSSES:
            raise ValueError(f"inner_loss must be one of {INNER_LOSSES}, got {inner_loss!r}")
        if fisher not in ("exact", "first-order"):
            raise ValueError(f"fisher must be 'exact' or 'first-order', got {fisher!r}")
        self.policy = policy
        self.train, self.train_advantages = train, train_advantages
        self.valid, self.valid_advantages = valid, valid_advantages
        self.inner_lr, self.inner_steps = inner_lr, inner_steps
        self.first_order = first_order
        self.vectorized = vectorized
        self.clip = clip
        self.fisher = fisher
        self.pre_update_kl = bool(pre_update_kl) and bool(inner_steps)
        self.inner_loss = inner_loss
        # The mean is over total_tasks (the whole meta-batch when this is one process's share)
        self.total_tasks = valid.num_tasks if total_tasks is None else int(total_tasks)
        if self.total_tasks < valid.num_tasks:
            raise ValueError(
                f"MetaObjective: total_tasks {total_tasks} < the {valid.num_tasks} tasks given"
            )
        self._old, self._old_pre = {}, {}

    def __call__(self, params: dict, create_graph: bool = True):
        if self.vectorized:
            return self._task_terms(params, None, create_graph)
        losses, kls = zip(
            *[self._task_terms(params, t, create_graph) for t in range(self.valid.num_tasks)]
        )
        return sum(losses[1:], losses[0]), sum(kls[1:], kls[0])

    def _task_terms(self, params: dict, t: int | None, create_graph: bool):
        """Mean over tasks (all, or task ``t``'s share of it) of the surrogate and the KL."""
        valid = self.valid if t is None else self.valid.task(t)
        adv = self.valid_advantages if t is None else self.valid_advantages[t : t + 1]
        if self.inner_steps:
            train = self.train if t is None else self.train.task(t)
            train_adv = self.train_advantages if t is None else self.train_advantages[t : t + 1]
            adapted = adapt_policy(
                self.policy, params, train, train_adv, self.inner_lr, self.inner_steps,
                first_order=self.first_order or not create_graph, inner_loss=self.inner_loss,
            )  # fmt: skip
        else:
            adapted = per_task(params, valid.num_tasks)
        dtype = next(iter(params.values())).dtype
        obs, actions = valid.flat(dtype)
        dist = self.policy(adapted, obs)
        metric = dist
        if self.inner_steps and create_graph and self.fisher == "first-order":
            # The same adapted values, with the inner update held constant: the KL's Hessian
            # is then the Fisher of the adapted policies, without the inner step's Jacobian
            # (a cheaper trust-region metric; the meta-gradient itself stays exact).
            base = per_task(params, valid.num_tasks)
            held = {k: base[k] + Tensor(adapted[k].data - base[k].data) for k in base}
            metric = self.policy(held, obs)
        if t not in self._old:
            self._old[t] = dist.detach()
        old = self._old[t]
        scale = 1.0 / self.total_tasks  # a mean over all tasks (of every process)
        weights = (_step_weights(valid.mask) * scale).astype(dtype)
        adv = adv.reshape(len(obs), -1).astype(dtype)
        ratio = exp(dist.log_prob(actions) - old.log_prob(actions))
        if self.clip is None:
            gain = ratio * adv
        else:  # PPO's pessimistic bound: min(r A, clip(r, 1 - eps, 1 + eps) A)
            gain = minimum(ratio * adv, tclip(ratio, 1.0 - self.clip, 1.0 + self.clip) * adv)
        loss = -tsum(gain * weights)
        kl = tsum(old.kl(metric) * weights)
        if self.pre_update_kl:
            kl = kl + self._pre_update_kl(params, train, t, scale)
        return loss, kl

    def _pre_update_kl(self, params: dict, train: Episodes, t: int | None, scale: float):
        """Mean over tasks (or task ``t``'s share) of the pre-update policy's KL from the
        one that sampled ``train``."""
        dtype = next(iter(params.values())).dtype
        obs, _ = train.flat(dtype)
        dist = self.policy(per_task(params, train.num_tasks), obs)
        if t not in self._old_pre:
            self._old_pre[t] = dist.detach()
        weights = (_step_weights(train.mask) * scale).astype(dtype)
        return tsum(self._old_pre[t].kl(dist) * weights)


def sample_meta_batch(
    family, policy, params: dict, tasks, rollouts: int, inner_lr: float, inner_steps: int, rng,
    gamma: float = 0.99, lam: float = 1.0,
):  # fmt: skip
    """Pre-update rollouts, the adapted parameters' values, and post-update rollouts:
    ``(train, train_adv, valid, valid_adv)`` (train is None with ``inner_steps=0``)."""
    if inner_steps == 0:
        valid = sample_episodes(family, policy, params, tasks, rollouts, rng)
        return None, None, valid, compute_advantages(valid, gamma, lam)
    train = sample_episodes(family, policy, params, tasks, rollouts, rng)
    train_adv = compute_advantages(train, gamma, lam)
    adapted = adapt_policy(policy, params, train, train_adv, inner_lr, inner_steps, True)
    adapted = {k: Tensor(v.data) for k, v in adapted.items()}
    valid = sample_episodes(family, policy, adapted, tasks, rollouts, rng)
    return train, train_adv, valid, compute_advantages(valid, gamma, lam)


def meta_trpo_iteration(
    family,
    policy,
    params: dict,
    tasks,
    rollouts: int,
    inner_lr: float,
    inner_steps: int,
    rng,
    first_order: bool = False,
    max_kl: float = 0.01,
    cg_iters: int = 10,
    damping: float = 1e-5,
    gamma: float = 0.99,
    lam: float = 1.0,
    fisher: str = "exact",
    total_tasks: int | None = None,
    reduce=None,
    pre_update_kl: bool = False,
    inner_loss: str = "reinforce",
) -> dict:
    """Sample, adapt and take one TRPO step on ``params`` (in place); returns diagnostics
    with the mean pre- and post-update returns. With ``tasks`` one process's share of a
    meta-batch of ``total_tasks``, ``reduce`` sums over processes (module docstring)."""
    batch = sample_meta_batch(
        family, policy, params, tasks, rollouts, inner_lr, inner_steps, rng, gamma, lam
    )
    objective = MetaObjective(
        policy, *batch, inner_lr, inner_steps, first_order, fisher=fisher,
        total_tasks=total_tasks, pre_update_kl=pre_update_kl, inner_loss=inner_loss,
    )  # fmt: skip
    info = trpo_step(
        params, objective, max_kl=max_kl, damping=damping, cg_iters=cg_iters, reduce=reduce
    )
    info.update(_mean_returns(batch, objective.total_tasks, reduce))
    return info


def _mean_returns(batch, total_tasks: int, reduce) -> dict:
    """Mean pre- and post-update returns over the whole meta-batch (summed over processes)."""
    train, _, valid, _ = batch
    pre = (train or valid).returns().mean(axis=1).sum() / total_tasks
    post = valid.returns().mean(axis=1).sum() / total_tasks
    sums = np.array([pre, post], dtype=np.float64)
    pre, post = sums if reduce is None else reduce(sums)
    return {"pre_return": float(pre), "post_return": float(post)}


def fine_tune_returns(
    family, policy, params: dict, tasks, rollouts: int, lr: float, steps: int, rng,
    gamma: float = 0.99, lam: float = 1.0,
):  # fmt: skip
    """Test-time adaptation: ``(returns (T, steps + 1), episodes)``, each task's mean return
    after 0..steps policy-gradient steps (fresh rollouts after each step), and the episodes
    sampled at each step."""
    current = {
        k: Tensor(np.ascontiguousarray(v.data), requires_grad=True)
        for k, v in per_task({k: Tensor(v.data) for k, v in params.items()}, len(tasks)).items()
    }
    returns, history = [], []
    for step in range(steps + 1):
        episodes = sample_episodes(family, policy, current, tasks, rollouts, rng)
        returns.append(episodes.returns().mean(axis=1))
        history.append(episodes)
        if step < steps:
            adv = compute_advantages(episodes, gamma, lam)
            loss = reinforce_loss(policy, current, episodes, adv)
            keys = list(current)
            grads = grad(loss, [current[k] for k in keys])
            current = {
                k: Tensor(current[k].data - lr * g.data, requires_grad=True)
                for k, g in zip(keys, grads)
            }
    return np.stack(returns, axis=1), history


def meta_adam_iteration(
    family,
    policy,
    params: dict,
    optimizer,
    tasks,
    rollouts: int,
    inner_lr: float,
    inner_steps: int,
    rng,
    first_order: bool = False,
    epochs: int = 5,
    clip: float = 0.2,
    gamma: float = 0.99,
    lam: float = 1.0,
    total_tasks: int | None = None,
    reduce=None,
    inner_loss: str = "reinforce",
) -> dict:
    """The simpler outer option: ``epochs`` steps of ``optimizer`` (Adam over ``params``)
    on the clipped surrogate min(r A, clip(r, 1 - eps, 1 + eps) A) of one meta-batch
    (``total_tasks``, ``reduce``: as in ``meta_trpo_iteration``; the gradients, the loss
    and the KL are summed over processes before each step)."""
    batch = sample_meta_batch(
        family, policy, params, tasks, rollouts, inner_lr, inner_steps, rng, gamma, lam
    )
    objective = MetaObjective(
        policy, *batch, inner_lr, inner_steps, first_order, clip=clip, total_tasks=total_tasks,
        inner_loss=inner_loss,
    )  # fmt: skip
    plist = list(params.values())
    losses, kl = [], None
    for _ in range(epochs):
        loss, kl = objective(params, create_graph=True)
        optimizer.zero_grad()
        loss.backward()
        scalars = np.array([loss.item(), kl.item()], dtype=np.float64)
        if reduce is not None:
            grads = [p.grad for p in plist]
            flat = reduce(flatten([g.data for g in grads] + [scalars]))
            for g, summed in zip(grads, unflatten(flat[:-2], grads)):
                g.data[...] = summed
            scalars = flat[-2:]
        optimizer.step()
        losses.append(float(scalars[0]))
        kl = float(scalars[1])
    return {
        "loss_before": losses[0],
        "loss_after": losses[-1],
        "kl": kl,
        **_mean_returns(batch, objective.total_tasks, reduce),
    }
