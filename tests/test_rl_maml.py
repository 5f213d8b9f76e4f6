"""MAML-RL: the meta-gradient through policy-gradient inner steps, vectorized vs looped."""

import numpy as np
import pytest

import tinymeta as tm
from tinymeta.autograd import grad
from tinymeta.meta.adaptation import per_task
from tinymeta.rl import make_task_family
from tinymeta.rl.episodes import Episodes, compute_advantages, sample_episodes
from tinymeta.rl.maml_rl import (
    MetaObjective,
    adapt_policy,
    fine_tune_returns,
    meta_adam_iteration,
    meta_trpo_iteration,
    reinforce_loss,
)
from tinymeta.rl.policy import CategoricalMLPPolicy, GaussianMLPPolicy
from tinymeta.rl.trpo import FisherVectorProduct, flatten, unflatten


def fixed_rollouts(inner_steps, seed=0, tasks=2):
    """A float64 2-6-2 tanh policy and fixed navigation rollouts (pre- and post-update)."""
    family = make_task_family("navigation", horizon=6)
    policy = GaussianMLPPolicy(2, 2, (6,), "tanh", init_std=0.3)
    params = policy.init_params(seed)
    goals = family.sample_tasks(tasks, seed)
    rng = np.random.default_rng(seed)
    train = sample_episodes(family, policy, params, goals, 3, rng)
    train_adv = compute_advantages(train)
    adapted = adapt_policy(policy, params, train, train_adv, 0.5, inner_steps, True)
    valid = sample_episodes(
        family, policy, {k: tm.tensor(v.data) for k, v in adapted.items()}, goals, 3, rng
    )
    return policy, params, (train, train_adv, valid, compute_advantages(valid))


def loss_at(objective, params, x):
    keys = list(params)
    shifted = {
        k: tm.tensor(a, requires_grad=True)
        for k, a in zip(keys, unflatten(x, [params[k] for k in keys]))
    }
    return objective(shifted, create_graph=False)[0].item()


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_meta_gradient_equals_finite_differences_of_inner_plus_outer(inner_steps):
    policy, params, batch = fixed_rollouts(inner_steps)
    objective = MetaObjective(policy, *batch, 0.5, inner_steps)
    loss, _ = objective(params, create_graph=True)
    analytic = flatten([g.data for g in grad(loss, list(params.values()))])
    x0 = flatten([p.data for p in params.values()])
    eps = 1e-6
    numeric = np.array(
        [
            (loss_at(objective, params, x0 + eps * e) - loss_at(objective, params, x0 - eps * e))
            / (2 * eps)
            for e in np.eye(len(x0))
        ]
    )
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)
    # The second-order terms matter here: the first-order meta-gradient is off.
    first_order = MetaObjective(policy, *batch, 0.5, inner_steps, first_order=True)
    fo_loss, _ = first_order(params, create_graph=True)
    fo = flatten([g.data for g in grad(fo_loss, list(params.values()))])
    assert np.linalg.norm(fo - numeric) > 1e-3 * np.linalg.norm(numeric)


def test_first_order_gradient_is_the_adapted_gradient_summed_over_tasks():
    policy, params, batch = fixed_rollouts(1)
    train, train_adv, valid, valid_adv = batch
    objective = MetaObjective(policy, *batch, 0.5, 1, first_order=True)
    loss, _ = objective(params, create_graph=True)
    fo = grad(loss, list(params.values()))
    adapted = adapt_policy(policy, params, train, train_adv, 0.5, 1, first_order=True)
    leaves = {k: tm.tensor(v.data, requires_grad=True) for k, v in adapted.items()}
    # The surrogate at the adapted values, as leaves: its gradient per task, summed.
    obs, actions = valid.flat()
    dist = policy(leaves, obs)
    weights = valid.mask.reshape(2, -1) / valid.mask.reshape(2, -1).sum(1, keepdims=True) / 2
    ratio = (dist.log_prob(actions) - objective._old[None].log_prob(actions)).exp()
    surrogate = -(ratio * valid_adv.reshape(2, -1) * weights).sum()
    grads = grad(surrogate, list(leaves.values()))
    for g, g_ref in zip(fo, grads):
        np.testing.assert_allclose(g.numpy(), g_ref.numpy().sum(axis=0), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("inner_steps, pre_update_kl", [(1, False), (2, False), (1, True)])
def test_vectorized_equals_looped(inner_steps, pre_update_kl):
    policy, params, batch = fixed_rollouts(inner_steps, seed=3, tasks=3)
    plist = list(params.values())
    results = []
    for vectorized in (True, False):
        objective = MetaObjective(
            policy, *batch, 0.5, inner_steps, vectorized=vectorized, pre_update_kl=pre_update_kl
        )
        loss, kl = objective(params, create_graph=True)
        g = flatten([x.data for x in grad(loss, plist, retain_graph=True)])
        v = np.random.default_rng(0).normal(size=len(g))
        # Move off the old policy so the KL is nonzero, then compare values too.
        moved = {k: tm.tensor(p.data + 0.01, requires_grad=True) for k, p in params.items()}
        moved_loss, moved_kl = objective(moved, create_graph=False)
        fvp = FisherVectorProduct(kl, plist)(v)
        results.append((loss.item(), g, fvp, moved_loss.item(), moved_kl.item()))
    (vec, loop) = results
    for a, b in zip(vec, loop):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)
    assert vec[4] > 0


def test_per_task_policy_forward_equals_each_task_alone():
    policy = GaussianMLPPolicy(2, 2, (7, 5), "relu")
    params = policy.init_params(0)
    rng = np.random.default_rng(1)
    task_params = {
        k: tm.tensor(v.data + rng.normal(size=v.data.shape) * 0.1)
        for k, v in per_task(params, 3).items()
    }
    obs = rng.normal(size=(3, 4, 2))
    batched = policy(task_params, obs)
    for t in range(3):
        alone = policy({k: tm.tensor(v.data[t]) for k, v in task_params.items()}, obs[t])
        np.testing.assert_allclose(batched.mean.numpy()[t], alone.mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(
            np.broadcast_to(batched.log_std.numpy()[t], (4, 2)),
            np.broadcast_to(alone.log_std.numpy(), (4, 2)),
        )


def test_inner_step_is_each_tasks_own_policy_gradient_step():
    policy, params, (train, train_adv, _, _) = fixed_rollouts(1, tasks=3)
    adapted = adapt_policy(policy, params, train, train_adv, 0.5, 1, first_order=True)
    for t in range(3):
        loss = reinforce_loss(policy, params, train.task(t), train_adv[t : t + 1])
        grads = grad(loss, list(params.values()))
        for (k, p), g in zip(params.items(), grads):
            np.testing.assert_allclose(adapted[k].numpy()[t], p.numpy() - 0.5 * g.numpy())


def test_categorical_policy_meta_gradient_matches_finite_differences():
    """The machinery is distribution-agnostic: a discrete policy on fixed random data."""
    rng = np.random.default_rng(0)
    policy = CategoricalMLPPolicy(3, 4, (5,), "tanh")
    params = policy.init_params(0)

    def episodes():
        obs = rng.normal(size=(2, 2, 4, 3))
        return Episodes(
            np.zeros((2, 1)), obs, rng.integers(0, 4, size=(2, 2, 4)),
            rng.normal(size=(2, 2, 4)), np.ones((2, 2, 4)),
        )  # fmt: skip

    train, valid = episodes(), episodes()
    batch = (train, rng.normal(size=(2, 2, 4)), valid, rng.normal(size=(2, 2, 4)))
    objective = MetaObjective(policy, *batch, 0.7, 1)
    loss, _ = objective(params, create_graph=True)
    analytic = flatten([g.data for g in grad(loss, list(params.values()))])
    x0 = flatten([p.data for p in params.values()])
    u = rng.normal(size=len(x0))
    eps = 1e-6
    numeric = (
        loss_at(objective, params, x0 + eps * u) - loss_at(objective, params, x0 - eps * u)
    ) / (2 * eps)
    assert analytic @ u == pytest.approx(numeric, rel=1e-6, abs=1e-10)


def test_meta_iterations_update_params_and_report_returns():
    family = make_task_family("navigation", horizon=8)
    policy = GaussianMLPPolicy(2, 2, (8,), "tanh")
    params = policy.init_params(0, dtype=np.float32)
    before = {k: p.numpy().copy() for k, p in params.items()}
    goals = family.sample_tasks(3, 0)
    info = meta_trpo_iteration(family, policy, params, goals, 2, 0.1, 1, 0, max_kl=0.05)
    assert info["step_fraction"] > 0 and 0 < info["kl"] <= 0.05
    assert any(not np.array_equal(before[k], p.numpy()) for k, p in params.items())
    assert np.isfinite(info["pre_return"]) and np.isfinite(info["post_return"])
    opt = tm.optim.Adam(list(params.values()), lr=1e-3)
    info = meta_adam_iteration(family, policy, params, opt, goals, 2, 0.1, 1, 0, epochs=3)
    assert info["loss_after"] < info["loss_before"]


def test_fine_tune_returns_shapes_and_seed():
    family = make_task_family("navigation", horizon=5)
    policy = GaussianMLPPolicy(2, 2, (4,), "tanh")
    params = policy.init_params(0)
    goals = family.sample_tasks(4, 0)
    returns, history = fine_tune_returns(family, policy, params, goals, 2, 0.1, 2, 7)
    again, _ = fine_tune_returns(family, policy, params, goals, 2, 0.1, 2, 7)
    assert returns.shape == (4, 3) and len(history) == 3
    np.testing.assert_array_equal(returns, again)
    np.testing.assert_allclose(returns[:, 0], history[0].returns().mean(axis=1))


def test_lvc_inner_step_takes_the_same_values_as_reinforce():
    policy, params, (train, train_adv, _, _) = fixed_rollouts(2, tasks=3)
    plain = adapt_policy(policy, params, train, train_adv, 0.5, 2)
    lvc = adapt_policy(policy, params, train, train_adv, 0.5, 2, inner_loss="lvc")
    for k in params:
        np.testing.assert_allclose(lvc[k].numpy(), plain[k].numpy(), rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="form must be one of"):
        reinforce_loss(policy, params, train, train_adv, "dice")


def test_lvc_meta_gradient_adds_the_sampling_curvature():
    """One inner step theta_i' = theta - a grad L_i(theta). The lvc form's Hessian of L_i
    has the extra term -sum_t c_t grad l_t grad l_t^T (l_t = log pi(a_t|s_t), c_t the
    step's weight times its advantage), so its meta-gradient exceeds reinforce's by
    a sum_i sum_t c_t grad l_t (grad l_t . u_i), u_i the outer loss's gradient at theta_i'.
    Checked step by step against per-step gradients."""
    policy, params, batch = fixed_rollouts(1, tasks=2)
    train, train_adv, valid, _ = batch
    plist = list(params.values())
    meta_grads = {}
    for form in ("reinforce", "lvc"):
        objective = MetaObjective(policy, *batch, 0.5, 1, inner_loss=form)
        loss, _ = objective(params, create_graph=True)
        meta_grads[form] = flatten([g.data for g in grad(loss, plist)])
    # u_i: the outer loss's gradient with respect to each task's adapted parameters
    # (the surrogate written out, as in the first-order test above).
    adapted = adapt_policy(policy, params, train, train_adv, 0.5, 1, first_order=True)
    leaves = {k: tm.tensor(v.data, requires_grad=True) for k, v in adapted.items()}
    valid_obs, valid_actions = valid.flat()
    old = objective._old[None]
    ratio = (policy(leaves, valid_obs).log_prob(valid_actions) - old.log_prob(valid_actions)).exp()
    valid_weights = valid.mask.reshape(2, -1) / valid.mask.reshape(2, -1).sum(1, keepdims=True) / 2
    outer = -(ratio * batch[3].reshape(2, -1) * valid_weights).sum()
    u = grad(outer, list(leaves.values()))
    expected = np.zeros_like(meta_grads["lvc"])
    obs, actions = train.flat()
    weights = train.mask.reshape(2, -1) / train.mask.reshape(2, -1).sum(1, keepdims=True)
    coefficients = weights * train_adv.reshape(2, -1)
    for task in range(2):
        u_task = flatten([g.numpy()[task] for g in u])
        for step in range(obs.shape[1]):
            if coefficients[task, step] == 0.0:
                continue
            log_prob = policy(params, obs[task, step][None]).log_prob(actions[task, step][None])
            g_step = flatten([g.data for g in grad(log_prob.sum(), plist)])
            expected += 0.5 * coefficients[task, step] * g_step * (g_step @ u_task)
    assert np.linalg.norm(expected) > 1e-3 * np.linalg.norm(meta_grads["reinforce"])
    np.testing.assert_allclose(
        meta_grads["lvc"] - meta_grads["reinforce"], expected, rtol=1e-8, atol=1e-12
    )
