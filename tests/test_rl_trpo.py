"""TRPO's pieces: conjugate gradient, Fisher-vector products, the line search."""

import numpy as np
import pytest

import tinymeta as tm
from tinymeta.autograd import grad
from tinymeta.rl import make_task_family
from tinymeta.rl.episodes import compute_advantages, sample_episodes
from tinymeta.rl.maml_rl import MetaObjective, adapt_policy
from tinymeta.rl.policy import GaussianMLPPolicy
from tinymeta.rl.trpo import FisherVectorProduct, conjugate_gradient, flatten, trpo_step, unflatten


def spd(n, rng, condition=100.0):
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return q @ np.diag(np.geomspace(1.0, condition, n)) @ q.T


@pytest.mark.parametrize("n", [1, 5, 30])
def test_conjugate_gradient_solves_spd_systems(n):
    rng = np.random.default_rng(n)
    a, b = spd(n, rng), rng.normal(size=n)
    x = conjugate_gradient(lambda v: a @ v, b, iters=4 * n, tol=1e-24)
    np.testing.assert_allclose(a @ x, b, atol=1e-8 * np.linalg.norm(b))
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-6, atol=1e-10)


def test_conjugate_gradient_error_falls_in_the_a_norm():
    rng = np.random.default_rng(1)
    a, b = spd(40, rng, condition=1e3), rng.normal(size=40)
    exact = np.linalg.solve(a, b)
    errors = []
    for k in range(1, 15):
        e = conjugate_gradient(lambda v: a @ v, b, iters=k) - exact
        errors.append(e @ a @ e)
    assert all(e2 <= e1 * (1 + 1e-9) for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < 0.2 * errors[0]


def tiny_setup(inner_steps=1, seed=0, hidden=(5,)):
    """A float64 2-5-2 tanh policy and fixed navigation rollouts of 2 tasks."""
    family = make_task_family("navigation", horizon=5)
    policy = GaussianMLPPolicy(2, 2, hidden, "tanh", init_std=0.5)
    params = policy.init_params(seed)
    tasks = family.sample_tasks(2, seed)
    rng = np.random.default_rng(seed)
    train = sample_episodes(family, policy, params, tasks, 3, rng)
    train_adv = compute_advantages(train)
    adapted = adapt_policy(policy, params, train, train_adv, 0.5, inner_steps, True)
    valid = sample_episodes(
        family, policy, {k: tm.tensor(v.data) for k, v in adapted.items()}, tasks, 3, rng
    )
    return policy, params, (train, train_adv, valid, compute_advantages(valid))


def numeric_hessian(fn_grad, params, eps=1e-5):
    """Central differences of an analytic gradient, column by column."""
    keys = list(params)
    x0 = flatten([params[k].data for k in keys])
    columns = []
    for j in range(len(x0)):
        cols = []
        for sign in (1.0, -1.0):
            x = x0.copy()
            x[j] += sign * eps
            shifted = {
                k: tm.tensor(a, requires_grad=True)
                for k, a in zip(keys, unflatten(x, [params[k] for k in keys]))
            }
            cols.append(fn_grad(shifted))
        columns.append((cols[0] - cols[1]) / (2 * eps))
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("inner_steps, pre_update_kl", [(0, False), (1, False), (1, True)])
def test_fisher_vector_product_is_the_hessian_of_the_mean_kl(inner_steps, pre_update_kl):
    policy, params, batch = tiny_setup(inner_steps=max(inner_steps, 1))
    if inner_steps == 0:
        batch = (None, None, batch[2], batch[3])
    objective = MetaObjective(
        policy, *batch, 0.5, inner_steps, fisher="exact", pre_update_kl=pre_update_kl
    )
    plist = list(params.values())
    _, kl = objective(params, create_graph=True)
    fvp = FisherVectorProduct(kl, plist, damping=0.0)

    def kl_grad(p):
        _, k = objective(p, create_graph=True)
        return flatten([g.data for g in grad(k, list(p.values()))])

    hessian = numeric_hessian(kl_grad, params)
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-7)
    rng = np.random.default_rng(5)
    for _ in range(3):
        v = rng.normal(size=hessian.shape[0])
        np.testing.assert_allclose(fvp(v), hessian @ v, rtol=1e-5, atol=1e-8)
    assert np.linalg.norm(hessian) > 1e-3  # a real curvature, not zeros on both sides
    damped = FisherVectorProduct(kl, plist, damping=0.1)
    np.testing.assert_allclose(damped(v), hessian @ v + 0.1 * v, rtol=1e-5, atol=1e-8)


def test_first_order_fisher_is_the_adapted_policies_fisher():
    """fisher="first-order": the Hessian of each task's KL w.r.t. its adapted parameters,
    averaged over tasks (the inner step's Jacobian taken as the identity)."""
    policy, params, batch = tiny_setup()
    train, train_adv, valid, valid_adv = batch
    objective = MetaObjective(policy, *batch, 0.5, 1, fisher="first-order")
    plist = list(params.values())
    _, kl = objective(params, create_graph=True)
    fvp = FisherVectorProduct(kl, plist)
    adapted = adapt_policy(policy, params, train, train_adv, 0.5, 1, True)
    v = np.random.default_rng(0).normal(size=sum(p.size for p in plist))
    expected = 0.0
    for t in range(2):
        theta_t = {k: tm.tensor(a.data[t], requires_grad=True) for k, a in adapted.items()}
        single = MetaObjective(policy, None, None, valid.task(t), valid_adv[t : t + 1], 0.5, 0)
        _, kl_t = single(theta_t, create_graph=True)
        expected = expected + FisherVectorProduct(kl_t, list(theta_t.values()))(v) / 2
    np.testing.assert_allclose(fvp(v), expected, rtol=1e-8, atol=1e-12)
    exact = MetaObjective(policy, *batch, 0.5, 1, fisher="exact")
    _, kl_exact = exact(params, create_graph=True)
    assert not np.allclose(FisherVectorProduct(kl_exact, plist)(v), expected, rtol=1e-6)


class Synthetic:
    """A surrogate and a 'KL' whose quadratic model misleads: TRPO must backtrack."""

    def __init__(self, rng, quartic):
        self.target = rng.normal(size=4)
        self.x0 = rng.normal(size=4) * 0.1
        self.quartic = quartic

    def __call__(self, params, create_graph=True):
        x = params["x"]
        d = x - tm.tensor(self.x0)
        loss = ((x - tm.tensor(self.target)) ** 2).sum() + (x * 3.0).sin().sum()
        kl = (d * d).sum() * 0.5 + (d**4).sum() * self.quartic
        return loss, kl


@pytest.mark.parametrize("seed", range(8))
def test_line_search_never_accepts_a_bad_step(seed):
    rng = np.random.default_rng(seed)
    objective = Synthetic(rng, quartic=float(rng.choice([0.0, 50.0, 5000.0])))
    max_kl = float(rng.choice([1e-3, 0.05, 0.5]))
    params = {"x": tm.tensor(objective.x0.copy(), requires_grad=True)}
    before = objective(params)[0].item()
    info = trpo_step(params, objective, max_kl=max_kl, ls_steps=int(rng.integers(1, 15)))
    loss, kl = (v.item() for v in objective(params))
    if info["step_fraction"] == 0.0:
        np.testing.assert_array_equal(params["x"].numpy(), objective.x0)
    else:
        assert loss < before and kl <= max_kl
        assert info["loss_after"] == pytest.approx(loss) and info["kl"] == pytest.approx(kl)


def test_line_search_leaves_params_when_no_step_is_acceptable():
    rng = np.random.default_rng(0)
    objective = Synthetic(rng, quartic=1e6)  # flat KL at x0: the full step is enormous
    objective.x0 = np.zeros(4)

    def flat_then_steep(params, create_graph=True):
        x = params["x"]
        loss, _ = objective(params)
        return loss, (x**4).sum() * 1e6

    params = {"x": tm.tensor(np.zeros(4), requires_grad=True)}
    info = trpo_step(params, flat_then_steep, max_kl=1e-3, damping=1e-5, ls_steps=3)
    assert info["step_fraction"] == 0.0
    np.testing.assert_array_equal(params["x"].numpy(), np.zeros(4))


def test_trpo_on_the_meta_objective_lowers_the_surrogate_within_the_trust_region():
    policy, params, batch = tiny_setup()
    objective = MetaObjective(policy, *batch, 0.5, 1)
    loss0, _ = objective(params, create_graph=False)
    info = trpo_step(params, objective, max_kl=0.01)
    loss1, kl1 = objective(params, create_graph=False)
    assert info["step_fraction"] > 0
    assert loss1.item() < loss0.item() and 0 < kl1.item() <= 0.01


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q):
    """KL(p || q) of diagonal Gaussians in closed form, summed over the last axis."""
    var_p, var_q = np.exp(2 * log_std_p), np.exp(2 * log_std_q)
    terms = log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5
    return terms.sum(axis=-1)


def pre_update_kl_by_hand(policy, old, new, train):
    """Mean over tasks of each task's mean over valid pre-update steps of
    KL(pi_old || pi_new), one task and one step at a time."""
    per_task_kl = []
    for t in range(train.num_tasks):
        obs, _ = train.task(t).flat()
        p = policy({k: tm.tensor(v.data) for k, v in old.items()}, obs[0])
        q = policy({k: tm.tensor(v.data) for k, v in new.items()}, obs[0])
        kl = gaussian_kl(p.mean.numpy(), p.log_std.numpy(), q.mean.numpy(), q.log_std.numpy())
        mask = train.mask[t].reshape(-1)
        per_task_kl.append((kl * mask).sum() / mask.sum())
    return float(np.mean(per_task_kl))


def moved(params, scale, seed=0):
    rng = np.random.default_rng(seed)
    return {
        k: tm.tensor(p.data + scale * rng.normal(size=p.shape), requires_grad=True)
        for k, p in params.items()
    }


def test_pre_update_kl_adds_the_pre_update_policies_mean_kl():
    policy, params, batch = tiny_setup()
    post_only = MetaObjective(policy, *batch, 0.5, 1)
    both = MetaObjective(policy, *batch, 0.5, 1, pre_update_kl=True)
    for objective in (post_only, both):
        objective(params, create_graph=False)  # the old policies: those that sampled
    new = moved(params, 0.05)
    loss_post, kl_post = post_only(new, create_graph=False)
    loss_both, kl_both = both(new, create_graph=False)
    expected = pre_update_kl_by_hand(policy, params, new, batch[0])
    assert expected > 1e-4
    assert loss_both.item() == loss_post.item()  # the surrogate is untouched
    np.testing.assert_allclose(kl_both.item() - kl_post.item(), expected, rtol=1e-10)


def test_trpo_with_pre_update_kl_bounds_pre_plus_post_kl():
    policy, params, batch = tiny_setup(seed=2)
    start = {k: tm.tensor(p.data.copy(), requires_grad=True) for k, p in params.items()}
    objective = MetaObjective(policy, *batch, 0.5, 1, pre_update_kl=True)
    info = trpo_step(params, objective, max_kl=0.01)
    assert info["step_fraction"] > 0
    post_only = MetaObjective(policy, *batch, 0.5, 1)
    post_only(start, create_graph=False)
    _, post_kl = post_only(params, create_graph=False)
    pre_kl = pre_update_kl_by_hand(policy, start, params, batch[0])
    assert pre_kl > 0 and post_kl.item() > 0
    assert pre_kl + post_kl.item() <= 0.01 * (1 + 1e-12)
    assert info["kl"] == pytest.approx(pre_kl + post_kl.item(), rel=1e-8)
