"""Meta-learning properties over generated cases (``tm.testing.strategies``).

Sinusoid meta-batches, shuffled N-way K-shot episodes, small float64 tanh networks and inner-loop
configurations are drawn by Hypothesis; for each, tinymeta's MAML must satisfy:

* the meta-gradient equals finite differences of the whole meta-loss (second order), and a
  first-order one is diagnosed as such wherever the second-order terms show;
* the task-vectorized meta-objective equals the looped one (value and meta-gradient);
* FOMAML's meta-gradient equals the detached reference (the query gradient at the adapted
  parameters, recomputed from fresh leaves) and what ``first_order_inner_grads`` makes of MAML;
* permuting the tasks of a meta-batch changes neither the meta-loss nor the meta-gradient;
* permuting the classes of an episode, together with the rows of the head, changes neither the
  meta-loss nor the meta-gradient of the body.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta import nn
from tinymeta.meta import maml_loss
from tinymeta.testing import check_meta_grads, first_order_inner_grads
from tinymeta.testing import strategies as tms
from tinymeta.testing.meta_check import FIRST_ORDER_DIAGNOSIS

# Each example runs a few dozen small meta-losses: a fraction of the profile's example count.
few = settings(max_examples=max(2, settings.default.max_examples // 3))


def mse(pred, target):
    return ((pred - target) ** 2).mean()


def cross_entropy(logits, labels):
    """Mean over every task's examples (logits (T, n, C) or (n, C))."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def meta_objective(batch, config, vectorized=True, loss_fn=mse, first_order=None):
    first_order = config.first_order if first_order is None else first_order

    def meta_loss(params):
        return maml_loss(
            tms.mlp_forward, params, batch.support, batch.query, loss_fn, config.lr,
            config.steps, first_order, vectorized=vectorized,
        )  # fmt: skip

    return meta_loss


def meta_gradient(meta_loss, params: dict) -> list:
    return [g.numpy() for g in tm.grad(meta_loss(params), list(params.values()))]


def assert_all_close(actual: list, expected: list, rtol=1e-9, atol=1e-12):
    for a, b in zip(actual, expected):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@few
@given(tms.sinusoid_task_batches(), tms.mlp_params(), tms.inner_loop_configs())
def test_meta_gradient_equals_finite_differences(batch, params, config):
    result = check_meta_grads(meta_objective(batch, config), params, directions=2)
    if not config.first_order:
        assert result.ok, result.report()
    else:  # FOMAML's meta-loss has MAML's value: its gradient is the first-order approximation
        assert result.ok == (not result.second_order_seen), result.report()
        if not result.ok:
            assert FIRST_ORDER_DIAGNOSIS in result.diagnosis
            assert {c.status for c in result.failed} == {"first-order"}


@given(tms.sinusoid_task_batches(), tms.mlp_params(), tms.inner_loop_configs())
def test_vectorized_equals_looped(batch, params, config):
    vectorized, looped = meta_objective(batch, config), meta_objective(batch, config, False)
    np.testing.assert_allclose(
        float(vectorized(params)), float(looped(params)), rtol=1e-10, atol=1e-12
    )
    assert_all_close(meta_gradient(vectorized, params), meta_gradient(looped, params))


def detached_fomaml_reference(batch, params: dict, config) -> list:
    """Mean over tasks of the query gradient at the adapted parameters, every inner step taken
    on fresh leaves (no graph links the adapted parameters to the initial ones)."""
    total = [np.zeros(p.shape) for p in params.values()]
    for t in range(batch.num_tasks):
        (xs, ys), (xq, yq) = batch.task(t).support, batch.task(t).query
        fast = {k: tm.tensor(p.numpy(), requires_grad=True) for k, p in params.items()}
        for _ in range(config.steps):
            gs = tm.grad(mse(tms.mlp_forward(fast, xs[0]), ys[0]), list(fast.values()))
            fast = {
                k: tm.tensor(p.numpy() - config.lr * g.numpy(), requires_grad=True)
                for (k, p), g in zip(fast.items(), gs)
            }
        gq = tm.grad(mse(tms.mlp_forward(fast, xq[0]), yq[0]), list(fast.values()))
        total = [s + g.numpy() / batch.num_tasks for s, g in zip(total, gq)]
    return total


@given(
    tms.sinusoid_task_batches(),
    tms.mlp_params(),
    tms.inner_loop_configs(first_order=True),
    st.booleans(),
)
def test_fomaml_equals_the_detached_reference(batch, params, config, vectorized):
    fomaml = meta_gradient(meta_objective(batch, config, vectorized), params)
    assert_all_close(fomaml, detached_fomaml_reference(batch, params, config))
    maml = meta_objective(batch, config, vectorized, first_order=False)
    with first_order_inner_grads():
        loss = maml(params)
    assert_all_close(fomaml, [g.numpy() for g in tm.grad(loss, list(params.values()))])


@given(
    tms.sinusoid_task_batches(num_tasks=(2, 4)),
    tms.mlp_params(),
    tms.inner_loop_configs(),
    st.booleans(),
    st.randoms(use_true_random=False),
)
def test_permuting_tasks_changes_nothing(batch, params, config, vectorized, random):
    order = list(range(batch.num_tasks))
    random.shuffle(order)
    original = meta_objective(batch, config, vectorized)
    permuted = meta_objective(batch.select(order), config, vectorized)
    np.testing.assert_allclose(float(permuted(params)), float(original(params)), rtol=1e-12)
    assert_all_close(meta_gradient(permuted, params), meta_gradient(original, params))


def permute_classes(batch: tms.TaskBatch, params: dict, head: str, perm: np.ndarray):
    """Relabel class c as perm[c] in every task, and move the head's row c to row perm[c]."""
    relabel = tm.tensor(perm)
    moved = dict(params)
    for name in (f"{head}.weight", f"{head}.bias"):
        rows = np.empty_like(params[name].numpy())
        rows[perm] = params[name].numpy()
        moved[name] = tm.tensor(rows, requires_grad=True)
    labels = [tm.tensor(relabel.numpy()[y.numpy()]) for y in (batch.ys, batch.yq)]
    return tms.TaskBatch(batch.xs, labels[0], batch.xq, labels[1]), moved


@given(st.data(), tms.inner_loop_configs(), st.booleans())
def test_permuting_classes_with_the_head_rows_changes_nothing(data, config, vectorized):
    batch = data.draw(tms.classification_task_batches(n_way=(2, 4)))
    n_way = int(batch.ys.numpy().max()) + 1
    params = data.draw(tms.mlp_params(in_features=batch.xs.shape[-1], out_features=n_way))
    head = max(int(k.split(".")[0]) for k in params)
    perm = np.asarray(data.draw(st.permutations(range(n_way))), dtype=np.int64)
    moved_batch, moved_params = permute_classes(batch, params, head, perm)

    original = meta_objective(batch, config, vectorized, cross_entropy)
    permuted = meta_objective(moved_batch, config, vectorized, cross_entropy)
    np.testing.assert_allclose(
        float(permuted(moved_params)), float(original(params)), rtol=1e-10, atol=1e-12
    )
    body = [k for k in params if not k.startswith(f"{head}.")]
    g = dict(zip(params, meta_gradient(original, params)))
    g_moved = dict(zip(params, meta_gradient(permuted, moved_params)))
    assert_all_close([g_moved[k] for k in body], [g[k] for k in body])
    # The head's gradient moves with its rows.
    np.testing.assert_allclose(g_moved[f"{head}.weight"][perm], g[f"{head}.weight"], atol=1e-12)


def test_episode_labels_are_balanced_and_shuffled():
    seen = set()

    @given(tms.episode_labels(n_way=3, k_shot=2))
    def collect(labels):
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(np.bincount(labels, minlength=3), [2, 2, 2])
        seen.add(tuple(labels))

    collect()
    assert len(seen) > 1  # not always the sorted layout


# --- the strategies give what they promise ----------------------------------------------------


class Tanh(nn.Module):
    def forward(self, x):
        return tm.tanh(x)


@given(tms.mlp_params(in_features=2, out_features=3), tms.arrays((4, 2)))
def test_mlp_params_are_keyed_like_a_sequential_and_mlp_forward_runs_it(params, x):
    layers = []
    for i in range(0, max(int(k.split(".")[0]) for k in params) + 1, 2):
        out_features, in_features = params[f"{i}.weight"].shape
        layers += [nn.Linear(in_features, out_features, dtype=tm.float64), Tanh()]
    model = nn.Sequential(*layers[:-1])
    assert all(p.dtype == np.float64 and p.requires_grad and p.is_leaf for p in params.values())
    expected = nn.functional_call(model, params, tm.tensor(x))
    np.testing.assert_allclose(tms.mlp_forward(params, tm.tensor(x)).numpy(), expected.numpy())


@given(tms.conv_params(in_channels=2, image_size=4), tms.arrays((3, 2, 4, 4)))
def test_conv_params_are_keyed_like_a_sequential_and_conv_forward_runs_it(params, x):
    c, c_in, k, _ = params["0.weight"].shape
    classes, flat = params["3.weight"].shape
    model = nn.Sequential(
        nn.Conv2d(c_in, c, k, dtype=tm.float64), Tanh(), nn.Flatten(),
        nn.Linear(flat, classes, dtype=tm.float64),
    )  # fmt: skip
    expected = nn.functional_call(model, params, tm.tensor(x))
    np.testing.assert_allclose(tms.conv_forward(params, tm.tensor(x)).numpy(), expected.numpy())


@given(tms.sinusoid_task_batches(num_tasks=(1, 4), k_support=3, k_query=(2, 6)))
def test_sinusoid_task_batches_have_the_promised_layout(batch):
    t = batch.num_tasks
    assert 1 <= t <= 4
    assert batch.xs.shape == batch.ys.shape == (t, 3, 1)
    assert batch.xq.shape[0] == t and 2 <= batch.xq.shape[1] <= 6
    assert all(a.dtype == np.float64 for a in (batch.xs, batch.ys, batch.xq, batch.yq))
    assert np.abs(batch.ys.numpy()).max() <= 5.0 and np.abs(batch.xs.numpy()).max() <= 5.0
    last = batch.task(t - 1)
    np.testing.assert_array_equal(last.xq.numpy(), batch.xq.numpy()[t - 1 :])


@given(tms.classification_task_batches(n_way=3, k_shot=2, k_query=1))
def test_classification_task_batches_are_balanced_episodes(batch):
    for labels, per_class in ((batch.ys, 2), (batch.yq, 1)):
        assert labels.dtype == np.int64
        for row in labels.numpy():
            np.testing.assert_array_equal(np.bincount(row, minlength=3), [per_class] * 3)
    assert batch.xs.shape == (batch.num_tasks, 6, 3)
