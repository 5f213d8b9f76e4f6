"""Correctness tests for tinymeta.meta: MAML, FOMAML, Reptile, ANIL, Meta-SGD, MAML++, learned opt.

The decisive check (STYLE.md, Tests): the second-order meta-gradient that tinymeta's own
backpropagation computes through the unrolled inner loop equals the central finite-difference
derivative of the *whole* inner-plus-outer computation. The finite differences are taken of an
independent reference written here in plain NumPy (hand-written MLP backprop for the inner
gradients, hand-written update rules), recomputed from scratch at every perturbed point, so a
bug in the engine or in ``tinymeta.meta`` cannot cancel out on both sides.

Everything is float64 and tiny (a 1-5-5-1 tanh MLP, three sinusoid tasks of a few points), so
full element-by-element finite differences are cheap. Tanh keeps the computation smooth, so the
finite differences are accurate to ~1e-9 and the tolerances can be tight.
"""

from __future__ import annotations

import numpy as np
import pytest

import tinymeta as tm
import tinymeta.nn as nn
from tinymeta.data import SinusoidTasks
from tinymeta.meta import (
    MAML,
    InnerSGD,
    LearnedOptimizer,
    MetaSGD,
    PerStepLR,
    adapt,
    annealed_step_weights,
    maml_loss,
    per_task,
    reptile_grads,
)

SIZES = (1, 5, 5, 1)
LR = 0.1  # large enough that the second-order terms are far above the FD tolerance
EPS = 1e-6
RTOL, ATOL = 1e-5, 1e-8


# --- a functional MLP, in tinymeta and in plain NumPy ---------------------------------------------


def init_mlp(sizes=SIZES, seed=0) -> dict:
    """{"0.weight": (out, in), "0.bias": (out,), ...} as float64 NumPy arrays."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"{i}.weight"] = rng.normal(0.0, 1.0 / np.sqrt(n_in), (n_out, n_in))
        params[f"{i}.bias"] = rng.normal(0.0, 0.1, n_out)
    return params


def leaves(arrays: dict) -> dict:
    return {k: tm.tensor(v.copy(), dtype=tm.float64, requires_grad=True) for k, v in arrays.items()}


def make_forward(act: str = "tanh"):
    """forward(p, x) = x @ W^T + b per layer; works for one task and with a leading task axis."""
    nonlin = {"tanh": tm.tanh, "relu": tm.relu}[act]

    def forward(p: dict, x):
        n_layers = len(p) // 2
        h = x
        for i in range(n_layers):
            h = h @ tm.swapaxes(p[f"{i}.weight"], -1, -2) + tm.expand_dims(p[f"{i}.bias"], -2)
            if i < n_layers - 1:
                h = nonlin(h)
        return h

    return forward


def mse(pred, target):
    return ((pred - target) ** 2).mean()


def np_loss_and_grad(p: dict, x: np.ndarray, y: np.ndarray, act: str = "tanh"):
    """MSE of the MLP on one task and its gradient w.r.t. every parameter (by hand)."""
    n_layers = len(p) // 2
    hs, zs = [x], []
    for i in range(n_layers):
        z = hs[-1] @ p[f"{i}.weight"].T + p[f"{i}.bias"]
        zs.append(z)
        if i < n_layers - 1:
            hs.append(np.tanh(z) if act == "tanh" else np.maximum(z, 0.0))
    out = zs[-1]
    loss = float(np.mean((out - y) ** 2))
    dz = 2.0 * (out - y) / out.size
    grads = {}
    for i in reversed(range(n_layers)):
        grads[f"{i}.weight"] = dz.T @ hs[i]
        grads[f"{i}.bias"] = dz.sum(axis=0)
        if i > 0:
            dh = dz @ p[f"{i}.weight"]
            dz = dh * (1.0 - hs[i] ** 2) if act == "tanh" else dh * (zs[i - 1] > 0)
    return loss, grads


def np_sgd(lr):
    def rule(params, grads, step, theta, state):
        return {k: params[k] - lr * grads[k] for k in grads}

    return rule


def np_adapt_path(theta, rule, x, y, steps, keys=None, act="tanh"):
    """Reference inner loop on one task: the list of params after 0..steps updates."""
    params = {k: v for k, v in theta.items() if "." in k and k[0].isdigit()}
    keys = list(params) if keys is None else list(keys)
    path = [params]
    state: dict = {}
    for step in range(steps):
        _, g = np_loss_and_grad(params, x, y, act)
        updated = rule({k: params[k] for k in keys}, {k: g[k] for k in keys}, step, theta, state)
        params = {**params, **updated}
        path.append(params)
    return path


def np_meta_loss(theta, rule, batch, steps, keys=None, weights=None, act="tanh") -> float:
    """Reference meta-objective: mean over tasks of the (weighted) post-adaptation query losses."""
    xs, ys, xq, yq = batch
    weights = [0.0] * (steps - 1) + [1.0] if weights is None else weights
    total = 0.0
    for t in range(len(xs)):
        path = np_adapt_path(theta, rule, xs[t], ys[t], steps, keys, act)
        for p, w in zip(path[1:], weights):
            total += w * np_loss_and_grad(p, xq[t], yq[t], act)[0]
    return total / len(xs)


def fd_grad(f, theta: dict, eps: float = EPS) -> dict:
    """Central finite differences of the scalar ``f(theta)``, element by element."""
    out = {}
    for k, v in theta.items():
        g = np.zeros_like(v, dtype=np.float64)
        for j in np.ndindex(v.shape):
            plus = {**theta, k: v.copy()}
            minus = {**theta, k: v.copy()}
            plus[k][j] += eps
            minus[k][j] -= eps
            g[j] = (f(plus) - f(minus)) / (2 * eps)
        out[k] = g
    return out


def meta_grads(loss, tensors: dict) -> dict:
    gs = tm.grad(loss, list(tensors.values()))
    return {k: g.numpy() for k, g in zip(tensors, gs)}


def assert_grads_close(actual: dict, expected: dict, rtol=RTOL, atol=ATOL):
    assert set(actual) == set(expected)
    for k in expected:
        np.testing.assert_allclose(actual[k], expected[k], rtol=rtol, atol=atol, err_msg=k)


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def sinusoid_batch(num_tasks=3, k_support=5, k_query=6, seed=1):
    """(xs, ys, xq, yq) as float64 arrays of shape (T, k, 1)."""
    b = SinusoidTasks(rng=seed).sample_batch(num_tasks, k_support, k_query)
    return tuple(np.asarray(a, dtype=np.float64) for a in b)


def as_tensors(batch):
    xs, ys, xq, yq = (tm.tensor(a, dtype=tm.float64) for a in batch)
    return (xs, ys), (xq, yq)


# --- 1. the decisive test: second-order meta-gradients vs finite differences --------------------


@pytest.mark.parametrize("vectorized", [True, False], ids=["vectorized", "looped"])
@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_matches_finite_differences(steps, vectorized):
    theta = init_mlp()
    batch = sinusoid_batch()
    params = leaves(theta)
    support, query = as_tensors(batch)
    loss = maml_loss(make_forward(), params, support, query, mse, LR, steps, vectorized=vectorized)

    def reference(th):
        return np_meta_loss(th, np_sgd(LR), batch, steps)

    assert float(loss) == pytest.approx(reference(theta), rel=1e-12)
    assert_grads_close(meta_grads(loss, params), fd_grad(reference, theta))


def _np_metasgd(params, grads, step, theta, state):
    return {k: params[k] - theta[f"lr.{k}"] * grads[k] for k in grads}


def _np_perstep(params, grads, step, theta, state):
    return {k: params[k] - theta[f"lr.{step}.{k}"] * grads[k] for k in grads}


@pytest.mark.parametrize("vectorized", [True, False], ids=["vectorized", "looped"])
def test_metasgd_learning_rate_gradients_match_finite_differences(vectorized):
    steps = 2
    theta = init_mlp()
    batch = sinusoid_batch()
    params = leaves(theta)
    rule = MetaSGD(params, init_lr=LR, dtype=tm.float64)
    # Distinct rates per entry, so a mix-up between entries or tensors would show.
    rng = np.random.default_rng(5)
    for lr in rule.lrs.values():
        lr.data[...] = rng.uniform(0.05, 0.15, lr.shape)
    support, query = as_tensors(batch)
    loss = maml_loss(
        make_forward(), params, support, query, mse, rule, steps, vectorized=vectorized
    )

    full = {**theta, **{f"lr.{k}": v.data.copy() for k, v in rule.lrs.items()}}
    expected = fd_grad(lambda th: np_meta_loss(th, _np_metasgd, batch, steps), full)
    assert float(loss) == pytest.approx(np_meta_loss(full, _np_metasgd, batch, steps), rel=1e-12)
    tensors = {**params, **rule.named_parameters()}
    assert_grads_close(meta_grads(loss, tensors), expected)


@pytest.mark.parametrize("vectorized", [True, False], ids=["vectorized", "looped"])
def test_per_step_lr_gradients_match_finite_differences(vectorized):
    steps = 3
    theta = init_mlp()
    batch = sinusoid_batch()
    params = leaves(theta)
    rule = PerStepLR(params, steps, init_lr=LR, dtype=tm.float64)
    rng = np.random.default_rng(6)
    for lr in rule.parameters():
        lr.data[...] = rng.uniform(0.05, 0.15)
    support, query = as_tensors(batch)
    loss = maml_loss(
        make_forward(), params, support, query, mse, rule, steps, vectorized=vectorized
    )

    full = {**theta, **{k: v.data.copy() for k, v in rule.named_parameters().items()}}
    expected = fd_grad(lambda th: np_meta_loss(th, _np_perstep, batch, steps), full)
    tensors = {**params, **rule.named_parameters()}
    grads = meta_grads(loss, tensors)
    assert_grads_close(grads, expected)
    # Every step's rate matters (a rule that reused step 0's rate would leave the others at zero).
    assert all(abs(float(grads[f"lr.{s}.0.weight"])) > 1e-6 for s in range(steps))


def _np_learned_opt(params, grads, step, theta, state):
    w = {k.split(".", 1)[1]: v for k, v in theta.items() if k.startswith("learned_opt.")}
    if step == 0:
        state.clear()
    new = {}
    for k, g in grads.items():
        prev = state.get(k, np.zeros_like(g))
        features = np.stack([g, np.tanh(g), prev], axis=-1)
        hidden = np.tanh(features @ w["w1"] + w["b1"])
        correction = (hidden @ w["w2"] + w["b2"])[..., 0]
        log_lr = w["log_lr"] if "log_lr" in w else w[f"log_lr.{k}"]
        update = np.exp(log_lr) * g + w["scale"] * correction
        state[k] = update
        new[k] = params[k] - update
    return new


@pytest.mark.parametrize(
    "vectorized, per_coordinate",
    [(True, False), (False, False), (True, True), (False, True)],
    ids=["vectorized", "looped", "vectorized-per-coordinate", "looped-per-coordinate"],
)
def test_learned_optimizer_gradients_match_finite_differences(vectorized, per_coordinate):
    steps = 2
    theta = init_mlp()
    batch = sinusoid_batch()
    params = leaves(theta)
    opt = LearnedOptimizer(
        lr=LR, hidden=4, rng=3, dtype=np.float64, params=params if per_coordinate else None
    )
    if per_coordinate:  # different rates per coordinate, so a mix-up would show
        rng = np.random.default_rng(5)
        for k, w in opt.weights.items():
            if k.startswith("log_lr."):
                w.data[...] += rng.uniform(-0.5, 0.5, w.shape)
    # scale starts at 0 (exactly MAML); make the MLP's correction part of the update.
    opt.weights["scale"].data[...] = 0.3
    opt.weights["b1"].data[...] = np.linspace(-0.2, 0.2, 4)
    opt.weights["b2"].data[...] = 0.05
    support, query = as_tensors(batch)
    loss = maml_loss(make_forward(), params, support, query, mse, opt, steps, vectorized=vectorized)

    full = {**theta, **{k: v.data.copy() for k, v in opt.named_parameters().items()}}
    expected = fd_grad(lambda th: np_meta_loss(th, _np_learned_opt, batch, steps), full)
    assert float(loss) == pytest.approx(
        np_meta_loss(full, _np_learned_opt, batch, steps), rel=1e-12
    )
    tensors = {**params, **opt.named_parameters()}
    grads = meta_grads(loss, tensors)
    assert_grads_close(grads, expected)
    assert np.abs(grads["learned_opt.w1"]).max() > 1e-6  # the MLP's weights do get trained


def test_learned_optimizer_per_coordinate_rates_start_as_meta_sgd():
    """With the MLP switched off (scale 0, as built), per-coordinate rates make the learned
    optimizer's inner loop exactly Meta-SGD's with the same rates."""
    theta = init_mlp()
    params = leaves(theta)
    opt = LearnedOptimizer(lr=0.02, hidden=4, rng=0, dtype=np.float64, params=params)
    sgd = MetaSGD(params, init_lr=0.02, dtype=np.float64)
    rng = np.random.default_rng(1)
    for k, lr in sgd.lrs.items():
        lr.data[...] = 0.02 * np.exp(rng.uniform(-1, 1, lr.shape))
        opt.weights[f"log_lr.{k}"].data[...] = np.log(lr.data)
    assert {k for k in opt.named_parameters() if "log_lr" in k} == {
        f"learned_opt.log_lr.{k}" for k in params
    }
    support, _ = as_tensors(sinusoid_batch())
    forward = make_forward()

    def loss_fn(p):
        return mse(forward(p, support[0][0]), support[1][0])

    a = adapt(loss_fn, params, opt, 3)
    b = adapt(loss_fn, params, sgd, 3)
    for k in params:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-13, err_msg=k)
    with pytest.raises(KeyError, match="no learned rates for parameter 'extra'"):
        opt({"extra": params["0.weight"]}, {"extra": params["0.weight"]}, 0, {})


# --- 2. FOMAML equals its closed form; second order differs ---------------------------------------


def fomaml_closed_form(theta, batch, steps, lr=LR, keys=None):
    """mean over tasks of grad L_query at the adapted params (adapted with detached gradients)."""
    xs, ys, xq, yq = batch
    keys = list(theta) if keys is None else keys
    total = {k: np.zeros_like(v) for k, v in theta.items()}
    for t in range(len(xs)):
        p = dict(theta)
        for _ in range(steps):
            _, g = np_loss_and_grad(p, xs[t], ys[t])
            p = {k: (v - lr * g[k] if k in keys else v) for k, v in p.items()}
        # Gradient w.r.t. the adapted params, by tinymeta's engine this time.
        adapted = leaves(p)
        q = mse(make_forward()(adapted, tm.tensor(xq[t])), tm.tensor(yq[t]))
        for k, g in meta_grads(q, adapted).items():
            total[k] += g / len(xs)
    return total


@pytest.mark.parametrize("vectorized", [True, False], ids=["vectorized", "looped"])
@pytest.mark.parametrize("steps", [1, 2])
def test_fomaml_equals_closed_form_and_differs_from_second_order(steps, vectorized):
    theta = init_mlp()
    batch = sinusoid_batch()
    params = leaves(theta)
    support, query = as_tensors(batch)
    forward = make_forward()

    def meta(first_order):
        loss = maml_loss(
            forward, params, support, query, mse, LR, steps, first_order, vectorized=vectorized
        )
        return meta_grads(loss, params)

    first = meta(True)
    expected = fomaml_closed_form(theta, batch, steps)
    assert_grads_close(first, expected, rtol=1e-10, atol=1e-12)
    second = meta(False)
    assert max_diff(first, second) > 1e3 * ATOL  # the second-order terms are really there


# --- 3. Reptile equals its definition -------------------------------------------------------------


@pytest.mark.parametrize("vectorized", [True, False], ids=["vectorized", "looped"])
def test_reptile_grads_equal_definition(vectorized):
    steps, lr = 4, 0.05
    theta = init_mlp()
    xs, ys, _, _ = sinusoid_batch(num_tasks=4)
    params = leaves(theta)
    support = (tm.tensor(xs), tm.tensor(ys))
    got = reptile_grads(make_forward(), params, support, mse, lr, steps, vectorized=vectorized)

    mean_adapted = {k: np.zeros_like(v) for k, v in theta.items()}
    for t in range(len(xs)):
        p = dict(theta)
        for _ in range(steps):
            _, g = np_loss_and_grad(p, xs[t], ys[t])
            p = {k: v - lr * g[k] for k, v in p.items()}
        for k in p:
            mean_adapted[k] += p[k] / len(xs)
    expected = {k: theta[k] - mean_adapted[k] for k in theta}
    assert set(got) == set(theta)
    assert_grads_close({k: v.numpy() for k, v in got.items()}, expected, rtol=1e-10, atol=1e-13)
    assert max(np.abs(v).max() for v in expected.values()) > 1e-3
    for k in theta:  # the meta-parameters themselves are not moved
        np.testing.assert_array_equal(params[k].numpy(), theta[k])


# --- 4. task-vectorized equals looped -------------------------------------------------------------


HEAD = ["2.weight", "2.bias"]


@pytest.mark.parametrize(
    "case",
    ["1-step", "5-steps", "metasgd", "anil", "multi-step-loss", "first-order"],
)
def test_vectorized_equals_looped(case):
    steps = {"1-step": 1, "5-steps": 5}.get(case, 3)
    theta = init_mlp(seed=2)
    batch = sinusoid_batch(num_tasks=4, seed=3)
    support, query = as_tensors(batch)
    forward = make_forward("relu")
    keys = HEAD if case == "anil" else None
    weights = [0.2, 0.3, 0.5] if case == "multi-step-loss" else None

    results = []
    for vectorized in (True, False):
        params = leaves(theta)
        rule = MetaSGD(params, init_lr=0.05, dtype=tm.float64) if case == "metasgd" else 0.05
        loss = maml_loss(
            forward, params, support, query, mse, rule, steps,
            first_order=case == "first-order", keys=keys, vectorized=vectorized,
            step_weights=weights,
        )  # fmt: skip
        tensors = dict(params)
        if case == "metasgd":
            tensors.update(rule.named_parameters())
        results.append((float(loss), meta_grads(loss, tensors)))
    (lv, gv), (ll, gl) = results
    assert lv == pytest.approx(ll, rel=1e-12)
    assert_grads_close(gv, gl, rtol=1e-9, atol=1e-12)
    assert max(np.abs(g).max() for g in gv.values()) > 1e-4


def test_multi_step_loss_is_the_weighted_sum_of_per_step_losses():
    theta = init_mlp()
    batch = sinusoid_batch()
    support, query = as_tensors(batch)
    forward = make_forward()
    weights = [0.2, 0.3, 0.5]
    params = leaves(theta)
    got = maml_loss(forward, params, support, query, mse, LR, 3, step_weights=weights)
    per_step = [float(maml_loss(forward, params, support, query, mse, LR, s + 1)) for s in range(3)]
    assert float(got) == pytest.approx(float(np.dot(weights, per_step)), rel=1e-12)

    def reference(th):
        return np_meta_loss(th, np_sgd(LR), batch, 3, weights=weights)

    assert_grads_close(meta_grads(got, params), fd_grad(reference, theta))


@pytest.mark.parametrize("case", ["1-step", "multi-step-loss", "last-step-unweighted", "anil"])
def test_maml_loss_returns_the_query_predictions_of_the_adapted_parameters(case):
    steps = 1 if case == "1-step" else 3
    weights = {"multi-step-loss": [0.2, 0.3, 0.5], "last-step-unweighted": [0.5, 0.5, 0.0]}
    weights = weights.get(case)
    keys = HEAD if case == "anil" else None
    theta = init_mlp(seed=4)
    (xs, ys), (xq, yq) = support, query = as_tensors(sinusoid_batch(num_tasks=3, seed=5))
    forward = make_forward("relu")
    results = {}
    for vectorized in (True, False):
        params = leaves(theta)
        loss, predictions = maml_loss(
            forward, params, support, query, mse, LR, steps, keys=keys, vectorized=vectorized,
            step_weights=weights, return_predictions=True,
        )  # fmt: skip
        plain = maml_loss(
            forward, params, support, query, mse, LR, steps, keys=keys, vectorized=vectorized,
            step_weights=weights,
        )  # fmt: skip
        assert float(loss) == float(plain)  # asking for the predictions changes nothing
        assert predictions.shape == yq.shape and predictions.requires_grad
        results[vectorized] = predictions.numpy()
        # The predictions are those of the parameters after the last inner step, task by task.
        for t in range(len(xs)):
            adapted = adapt(
                lambda p, t=t: mse(forward(p, xs[t]), ys[t]), params, LR, steps, keys=keys
            )
            want = forward(adapted, xq[t]).numpy()
            np.testing.assert_allclose(results[vectorized][t], want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(results[True], results[False], rtol=1e-10, atol=1e-12)
    # ... and not those of the initial parameters.
    before = np.stack([forward(leaves(theta), xq[t]).numpy() for t in range(len(xs))])
    assert np.abs(results[True] - before).max() > 1e-3


# --- 5. ANIL: only the head adapts; the body still gets a second-order meta-gradient --------------


def test_anil_adapts_only_the_head():
    theta = init_mlp()
    xs, ys, _, _ = sinusoid_batch()
    params = leaves(theta)
    forward = make_forward()
    x, y = tm.tensor(xs[0]), tm.tensor(ys[0])
    adapted = adapt(lambda p: mse(forward(p, x), y), params, LR, steps=2, keys=HEAD)
    assert set(adapted) == set(params)
    for k in params:
        if k in HEAD:
            assert adapted[k] is not params[k]
            assert not np.allclose(adapted[k].numpy(), theta[k])
        else:
            assert adapted[k] is params[k]
    for k in params:  # nothing mutated
        np.testing.assert_array_equal(params[k].numpy(), theta[k])


@pytest.mark.parametrize("vectorized", [True, False], ids=["vectorized", "looped"])
def test_anil_body_meta_gradient_matches_finite_differences(vectorized):
    steps = 2
    theta = init_mlp()
    batch = sinusoid_batch()
    params = leaves(theta)
    support, query = as_tensors(batch)
    forward = make_forward()

    def meta(first_order):
        loss = maml_loss(
            forward, params, support, query, mse, LR, steps, first_order, keys=HEAD,
            vectorized=vectorized,
        )  # fmt: skip
        return meta_grads(loss, params)

    second = meta(False)

    def reference(th):
        return np_meta_loss(th, np_sgd(LR), batch, steps, keys=HEAD)

    assert_grads_close(second, fd_grad(reference, theta))
    body = [k for k in theta if k not in HEAD]
    assert all(np.abs(second[k]).max() > 1e-4 for k in body)
    # The body's gradient includes the path through the head's adaptation (d g_head / d body).
    first = meta(True)
    assert max(float(np.abs(first[k] - second[k]).max()) for k in body) > 1e-5


# --- 6. MAML++ annealed multi-step loss weights ---------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_annealed_step_weights(steps):
    total = 1000
    for it in [0, 1, 250, 999, 1000, 5000]:
        w = annealed_step_weights(steps, it, total)
        assert len(w) == steps
        assert sum(w) == pytest.approx(1.0, abs=1e-12)
        assert all(x > 0 for x in w)
    np.testing.assert_allclose(annealed_step_weights(steps, 0, total), np.full(steps, 1 / steps))
    late = annealed_step_weights(steps, total, total)
    assert late[-1] == max(late)
    if steps > 1:
        assert late[-1] > 0.9
        assert all(x < 0.05 for x in late[:-1])
        mid = annealed_step_weights(steps, total // 2, total)
        # The earlier steps' weights decay linearly (documented): half-way they are halved.
        np.testing.assert_allclose(mid[:-1], 0.5 / steps)
        assert 1 / steps < mid[-1] < late[-1]
        assert annealed_step_weights(steps, 10 * total, total) == late


def test_annealed_weights_plug_into_maml_loss():
    theta = init_mlp()
    support, query = as_tensors(sinusoid_batch())
    params = leaves(theta)
    forward = make_forward()
    w = annealed_step_weights(3, 0, 100)
    loss = maml_loss(forward, params, support, query, mse, LR, 3, step_weights=w)
    per_step = [float(maml_loss(forward, params, support, query, mse, LR, s)) for s in (1, 2, 3)]
    assert float(loss) == pytest.approx(np.mean(per_step), rel=1e-12)


# --- adapt and per_task basics -------------------------------------------------------------------


def test_adapt_is_pure_and_trajectory_is_consistent():
    theta = init_mlp()
    xs, ys, _, _ = sinusoid_batch()
    params = leaves(theta)
    forward = make_forward()
    x, y = tm.tensor(xs[0]), tm.tensor(ys[0])
    path = adapt(lambda p: mse(forward(p, x), y), params, LR, steps=3, trajectory=True)
    assert len(path) == 4
    assert all(path[0][k] is params[k] for k in params)
    ref = np_adapt_path(theta, np_sgd(LR), xs[0], ys[0], 3)
    for got, want in zip(path, ref):
        assert_grads_close({k: v.numpy() for k, v in got.items()}, want, rtol=1e-12, atol=1e-14)
    for k in params:
        np.testing.assert_array_equal(params[k].numpy(), theta[k])
    last = adapt(lambda p: mse(forward(p, x), y), params, InnerSGD(LR), steps=3)
    assert_grads_close({k: v.numpy() for k, v in last.items()}, ref[-1], rtol=1e-12, atol=1e-14)


def test_per_task_broadcasts_and_sums_gradients_back():
    p = tm.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    q = tm.tensor(np.ones(3), requires_grad=True)
    out = per_task({"p": p, "q": q}, 4, keys=["p"])
    assert out["p"].shape == (4, 2, 3)
    assert out["q"] is q
    np.testing.assert_array_equal(out["p"].numpy()[2], p.numpy())
    weights = np.arange(24.0).reshape(4, 2, 3)
    (g,) = tm.grad((out["p"] * tm.tensor(weights)).sum(), [p])
    np.testing.assert_allclose(g.numpy(), weights.sum(axis=0))


# --- 7. learn2learn's classic checks, with the MAML/Learner wrapper over tinymeta.nn -------------


def nn_mlp(seed=0, hidden=8):
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Linear(1, hidden, dtype=tm.float64, rng=rng),
        nn.ReLU(),
        nn.Linear(hidden, hidden, dtype=tm.float64, rng=rng),
        nn.ReLU(),
        nn.Linear(hidden, 1, dtype=tm.float64, rng=rng),
    )


def one_task(seed=4, k_support=10, k_query=20):
    xs, ys, xq, yq = sinusoid_batch(num_tasks=1, k_support=k_support, k_query=k_query, seed=seed)
    return tuple(tm.tensor(a[0]) for a in (xs, ys, xq, yq))


def test_clone_equals_original():
    model = nn_mlp()
    maml = MAML(model, lr=0.01)
    learner = maml.clone()
    x = tm.tensor(np.linspace(-5, 5, 7)[:, None])
    np.testing.assert_array_equal(learner(x).numpy(), model(x).numpy())
    np.testing.assert_array_equal(maml(x).numpy(), model(x).numpy())
    named = dict(model.named_parameters())
    assert list(learner.params) == list(named)
    for k, p in named.items():
        np.testing.assert_array_equal(learner.params[k].numpy(), p.numpy())
    # A clone of an adapted learner carries its adapted parameters, independently.
    xs, ys, _, _ = one_task()
    learner.adapt(nn.functional.mse_loss(learner(xs), ys))
    twin = learner.clone()
    np.testing.assert_array_equal(twin(x).numpy(), learner(x).numpy())
    assert not np.allclose(twin(x).numpy(), model(x).numpy())
    twin.adapt(nn.functional.mse_loss(twin(xs), ys))
    assert learner.steps_taken == 1 and twin.steps_taken == 2
    assert not np.allclose(twin(x).numpy(), learner(x).numpy())


@pytest.mark.parametrize("rule", ["sgd", "metasgd"])
def test_every_initial_parameter_receives_gradient(rule):
    model = nn_mlp()
    lr = MetaSGD(dict(model.named_parameters()), init_lr=0.05) if rule == "metasgd" else 0.05
    maml = MAML(model, lr=lr)
    xs, ys, xq, yq = one_task()
    learner = maml.clone()
    for _ in range(2):
        learner.adapt(nn.functional.mse_loss(learner(xs), ys))
    nn.functional.mse_loss(learner(xq), yq).backward()
    meta_params = maml.parameters()
    assert len(meta_params) == len(list(model.parameters())) + (6 if rule == "metasgd" else 0)
    for p in meta_params:
        assert p.grad is not None, p.name
        assert np.abs(p.grad.numpy()).max() > 0, p.name


def test_query_loss_drops_after_adaptation():
    drops = []
    for seed in range(5):
        maml = MAML(nn_mlp(seed=seed), lr=0.01)
        xs, ys, xq, yq = one_task(seed=10 + seed)
        learner = maml.clone()
        before = float(nn.functional.mse_loss(learner(xq), yq))
        for _ in range(5):
            learner.adapt(nn.functional.mse_loss(learner(xs), ys))
        after = float(nn.functional.mse_loss(learner(xq), yq))
        drops.append(before - after)
    assert all(d > 0 for d in drops), drops


def test_adapt_leaves_the_model_untouched():
    model = nn_mlp()
    before = {k: (p, p.numpy().copy()) for k, p in model.named_parameters()}
    maml = MAML(model, lr=0.05)
    xs, ys, xq, yq = one_task()
    learner = maml.clone()
    for _ in range(3):
        learner.adapt(nn.functional.mse_loss(learner(xs), ys))
    assert float(nn.functional.mse_loss(learner(xq), yq)) != float(
        nn.functional.mse_loss(model(xq), yq)
    )
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for k, (p, values) in before.items():
        assert after[k] is p
        np.testing.assert_array_equal(p.numpy(), values)
        assert p.grad is None  # adapt uses tm.grad: nothing is accumulated
        assert learner.params[k] is not p


def test_learner_first_order_equals_fomaml_closed_form():
    lr, steps = 0.05, 2
    model = nn_mlp()
    names = [k for k, _ in model.named_parameters()]
    xs, ys, xq, yq = one_task()
    mse_loss = nn.functional.mse_loss

    learner = MAML(model, lr=lr, first_order=True).clone()
    for _ in range(steps):
        learner.adapt(mse_loss(learner(xs), ys))
    got = tm.grad(mse_loss(learner(xq), yq), list(model.parameters()))

    p = {k: v.numpy().copy() for k, v in model.named_parameters()}
    for _ in range(steps):
        t = leaves(p)
        g = meta_grads(mse_loss(nn.functional_call(model, t, xs), ys), t)
        p = {k: p[k] - lr * g[k] for k in p}
    adapted = leaves(p)
    expected = meta_grads(mse_loss(nn.functional_call(model, adapted, xq), yq), adapted)
    assert_grads_close(dict(zip(names, (g.numpy() for g in got))), expected, rtol=1e-10, atol=1e-13)

    # Second order (the default) differs.
    learner = MAML(model, lr=lr).clone()
    for _ in range(steps):
        learner.adapt(mse_loss(learner(xs), ys))
    second = tm.grad(mse_loss(learner(xq), yq), list(model.parameters()))
    assert max_diff(dict(zip(names, (g.numpy() for g in second))), expected) > 1e-6


@pytest.mark.parametrize("rule", ["sgd", "metasgd", "anil"])
def test_learner_meta_gradient_equals_functional_maml_loss(rule):
    """The wrapper and the functional core agree (the latter is checked against FD above)."""
    steps, mse_loss = 3, nn.functional.mse_loss
    model = nn_mlp()
    named = dict(model.named_parameters())
    keys = ["4.weight", "4.bias"] if rule == "anil" else None
    lr = MetaSGD(named, init_lr=0.05, dtype=tm.float64) if rule == "metasgd" else 0.05
    maml = MAML(model, lr=lr, keys=keys)
    batch = sinusoid_batch(num_tasks=3, k_support=6, k_query=7, seed=8)
    (xs, ys), (xq, yq) = as_tensors(batch)

    total = None
    for t in range(len(batch[0])):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(mse_loss(learner(xs[t]), ys[t]))
        q = mse_loss(learner(xq[t]), yq[t])
        total = q if total is None else total + q
    total = total * (1.0 / len(batch[0]))
    meta = maml.parameters()
    got = tm.grad(total, meta)

    loss = maml_loss(
        lambda p, x: nn.functional_call(model, p, x), named, (xs, ys), (xq, yq), mse_loss,
        maml.rule, steps, keys=keys, vectorized=False,
    )  # fmt: skip
    expected = tm.grad(loss, meta)
    assert float(total) == pytest.approx(float(loss), rel=1e-12)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-13)


def test_learner_adapt_raises_when_loss_does_not_depend_on_params():
    model = nn_mlp()
    maml = MAML(model, lr=0.05)
    xs, ys, _, _ = one_task()
    learner = maml.clone()
    learner.adapt(nn.functional.mse_loss(learner(xs), ys))
    # Computed with the model, not the (adapted) learner: the learner's params are not used.
    with pytest.raises(RuntimeError, match="does not depend on parameters"):
        learner.adapt(nn.functional.mse_loss(model(xs), ys))
    # A loss that depends on nothing at all that requires grad.
    with pytest.raises(RuntimeError, match="require"):
        maml.clone().adapt(nn.functional.mse_loss(ys, ys))
    assert learner.steps_taken == 1  # the failed calls changed nothing


def test_learned_optimizer_memory_is_per_learner():
    """A learner's updates must not depend on what other learners (other tasks) did meanwhile.

    LearnedOptimizer keeps its one-step memory (the previous update) on the rule object, keyed
    by parameter name, so two learners sharing the rule (``maml.clone()`` per task) overwrite
    each other's memory when their adapt calls interleave.
    """
    opt = LearnedOptimizer(lr=0.05, hidden=4, rng=0, dtype=np.float64)
    opt.weights["scale"].data[...] = 0.5  # make the memory feature matter
    maml = MAML(nn_mlp(), lr=opt)
    mse_loss = nn.functional.mse_loss
    xa, ya, _, _ = one_task(seed=1)
    xb, yb, _, _ = one_task(seed=2)

    alone = maml.clone()
    for _ in range(2):
        alone.adapt(mse_loss(alone(xa), ya))

    a, b = maml.clone(), maml.clone()
    a.adapt(mse_loss(a(xa), ya))
    b.adapt(mse_loss(b(xb), yb))  # another task's first step, in between
    a.adapt(mse_loss(a(xa), ya))
    for k in alone.params:
        np.testing.assert_allclose(a.params[k].numpy(), alone.params[k].numpy(), err_msg=k)


# --- 8. a small conv net with BatchNorm: second-order meta-gradient vs finite differences ---------


def conv_bn_net(seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, dtype=tm.float64, rng=rng),
        nn.BatchNorm2d(2, dtype=tm.float64),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 2, dtype=tm.float64, rng=rng),
    )


def conv_tasks(num_tasks=2, n=4, seed=0):
    """Two-class 1x5x5 'images': class 1 has a brighter centre. Labels 0,1,0,1,..."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (num_tasks, 2 * n, 1, 5, 5))
    y = np.tile(np.arange(2), (num_tasks, n))
    x[..., 1:4, 1:4] += 0.8 * y[..., None, None, None]
    return (x[:, :n], y[:, :n]), (x[:, n:], y[:, n:])


@pytest.mark.parametrize("steps", [1, 3])
def test_conv_batchnorm_maml_meta_gradient_matches_finite_differences(steps):
    lr = 0.5
    model = conv_bn_net()
    cross_entropy = nn.functional.cross_entropy
    theta = {k: v.numpy().copy() for k, v in model.named_parameters()}
    (xs, ys), (xq, yq) = conv_tasks()
    support = (tm.tensor(xs), tm.tensor(ys))
    query = (tm.tensor(xq), tm.tensor(yq))

    def forward(p, x):
        return nn.functional_call(model, p, x)

    def forward_to_relu(p, x):
        """The pre-activations (conv -> batch norm) that the ReLU sees."""
        with tm.no_grad():
            h = nn.functional.conv2d(tm.tensor(x), p["0.weight"], p["0.bias"])
            h = nn.functional.batch_norm(h, None, None, p["1.weight"], p["1.bias"], training=True)
        return h.numpy()

    def reference(th, check_kinks=False):
        """Query loss after the inner steps, from scratch, values only (first-order inner grads)."""
        total = 0.0
        for t in range(len(xs)):
            p = leaves(th)
            for step in range(steps + 1):
                if check_kinks:  # a finite difference across a ReLU kink would be meaningless
                    for x in (xs[t], xq[t]):
                        assert np.abs(forward_to_relu(p, x)).min() > 1e-4
                if step == steps:
                    break
                g = meta_grads(cross_entropy(forward(p, tm.tensor(xs[t])), ys[t]), p)
                p = leaves({k: p[k].numpy() - lr * g[k] for k in p})
            with tm.no_grad():
                total += float(cross_entropy(forward(p, tm.tensor(xq[t])), yq[t]))
        return total / len(xs)

    # The inner gradient itself is right (so the FD reference below is too).
    def support_loss(th):
        return float(cross_entropy(forward(leaves(th), tm.tensor(xs[0])), ys[0]))

    p0 = leaves(theta)
    assert_grads_close(
        meta_grads(cross_entropy(forward(p0, tm.tensor(xs[0])), ys[0]), p0),
        fd_grad(support_loss, theta),
        rtol=1e-6,
        atol=1e-9,
    )

    params = leaves(theta)
    loss = maml_loss(forward, params, support, query, cross_entropy, lr, steps, vectorized=False)
    assert float(loss) == pytest.approx(reference(theta, check_kinks=True), rel=1e-12)
    second = meta_grads(loss, params)
    assert_grads_close(second, fd_grad(reference, theta), rtol=1e-5, atol=1e-8)
    first = meta_grads(
        maml_loss(
            forward, params, support, query, cross_entropy, lr, steps, True, vectorized=False
        ),
        params,
    )
    assert max_diff(first, second) > 1e-4  # the second-order terms through BN are really there


# --- 9. errors -----------------------------------------------------------------------------------


def test_adapt_unknown_keys_raises_key_error_naming_them():
    params = leaves(init_mlp())
    with pytest.raises(KeyError, match=r"head\.weight"):
        adapt(lambda p: (p["0.weight"] ** 2).sum(), params, LR, keys=["0.weight", "head.weight"])


def test_step_weights_of_wrong_length_raise():
    params = leaves(init_mlp())
    support, query = as_tensors(sinusoid_batch())
    with pytest.raises(ValueError, match="step_weights"):
        maml_loss(make_forward(), params, support, query, mse, LR, 3, step_weights=[0.5, 0.5])


@pytest.mark.parametrize("vectorized", [True, False], ids=["vectorized", "looped"])
def test_maml_loss_degenerate_step_counts(vectorized):
    """steps=0 is the query loss before adaptation (or a clear ValueError), never None or a
    TypeError from inside; all-zero step_weights (no loss at all) raise a ValueError."""
    theta = init_mlp()
    support, query = as_tensors(sinusoid_batch())
    params = leaves(theta)
    forward = make_forward()
    try:
        loss = maml_loss(forward, params, support, query, mse, LR, 0, vectorized=vectorized)
    except ValueError as e:
        assert "steps" in str(e)
    else:
        assert isinstance(loss, tm.Tensor)
        assert float(loss) == pytest.approx(float(mse(forward(params, query[0]), query[1])))
    with pytest.raises(ValueError, match="step_weights"):
        maml_loss(
            forward, params, support, query, mse, LR, 2, step_weights=[0.0, 0.0],
            vectorized=vectorized,
        )  # fmt: skip


def test_update_rule_errors():
    with pytest.raises(ValueError):
        InnerSGD(0.0)
    params = leaves(init_mlp())
    with pytest.raises(TypeError):
        adapt(lambda p: (p["0.weight"] ** 2).sum(), params, rule="fast")
    rule = PerStepLR(params, steps=1, dtype=tm.float64)
    with pytest.raises(IndexError, match="PerStepLR"):
        adapt(lambda p: (p["0.weight"] ** 2).sum(), params, rule, steps=2, keys=["0.weight"])
