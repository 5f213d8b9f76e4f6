"""MAML++'s per-step BatchNorm statistics: one row of running statistics per inner step.

Row k belongs to the network whose parameters have had k inner updates. The checks recompute
each row's expected value from the adaptation trajectory (momentum 1: a row holds exactly the
last batch statistics it saw), so a forward that reads or writes the wrong row fails.
"""

from __future__ import annotations

import numpy as np
import pytest

import tinymeta as tm
import tinymeta.nn as nn
import tinymeta.nn.functional as F
from tinymeta.meta import MAML, adapt, maml_loss

C = 4


def net(per_step, seed=0):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(
        nn.Linear(3, C, rng=rng, dtype=tm.float64),
        nn.BatchNorm1d(C, momentum=1.0, per_step=per_step, dtype=tm.float64),
        nn.ReLU(),
        nn.Linear(C, 1, rng=rng, dtype=tm.float64),
    )
    return model


def first_layer_stats(params, x):
    """Batch mean and unbiased variance of the first layer's output (what BN's row must hold)."""
    h = (x @ params["0.weight"].data.T) + params["0.bias"].data
    return h.mean(axis=0), h.var(axis=0, ddof=1)


def data(seed=1, n=6):
    rng = np.random.default_rng(seed)
    return tm.tensor(rng.normal(size=(n, 3))), tm.tensor(rng.normal(size=(n, 1)))


def test_buffers_have_one_row_per_step_and_survive_a_checkpoint(tmp_path):
    bn = nn.BatchNorm2d(5, per_step=3)
    assert bn.running_mean.shape == (3, 5)
    assert bn.running_var.shape == (3, 5)
    assert bn.num_batches_tracked.shape == (3,)
    assert "per_step=3" in repr(bn)
    bn.running_mean.data[1] = 7.0
    tm.save(bn.state_dict(), tmp_path / "bn.npz")
    other = nn.BatchNorm2d(5, per_step=3)
    other.load_state_dict(tm.load(tmp_path / "bn.npz"))
    np.testing.assert_array_equal(other.running_mean.numpy(), bn.running_mean.numpy())


@pytest.mark.parametrize("bad", [0, -1, True])
def test_per_step_must_be_a_positive_int(bad):
    with pytest.raises((TypeError, ValueError), match="per_step"):  # TypeError for a bool
        nn.BatchNorm1d(3, per_step=bad)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_inner_step_rejects_what_is_not_a_step(bad):
    with pytest.raises((TypeError, ValueError), match="inner_step"):  # TypeError: not an int
        with nn.inner_step(bad):
            pass


def test_inner_step_nests_and_restores():
    assert nn.current_inner_step() is None
    with nn.inner_step(2):
        with nn.inner_step(0):
            assert nn.current_inner_step() == 0
        assert nn.current_inner_step() == 2
    assert nn.current_inner_step() is None


def test_training_forward_updates_only_the_current_row():
    rng = np.random.default_rng(0)
    bn = nn.BatchNorm1d(C, momentum=1.0, per_step=3, dtype=tm.float64)
    x = tm.tensor(rng.normal(size=(8, C)) * 3 + 1)
    with nn.inner_step(1):
        bn(x)
    mean, var = x.numpy().mean(0), x.numpy().var(0, ddof=1)
    np.testing.assert_allclose(bn.running_mean.numpy()[1], mean)
    np.testing.assert_allclose(bn.running_var.numpy()[1], var)
    np.testing.assert_array_equal(bn.running_mean.numpy()[[0, 2]], 0.0)
    np.testing.assert_array_equal(bn.running_var.numpy()[[0, 2]], 1.0)
    np.testing.assert_array_equal(bn.num_batches_tracked.numpy(), [0, 1, 0])
    bn(x)  # outside an inner loop: the last row
    np.testing.assert_array_equal(bn.num_batches_tracked.numpy(), [0, 1, 1])
    with nn.inner_step(9):  # beyond the rows: clamped to the last
        bn(x)
    np.testing.assert_array_equal(bn.num_batches_tracked.numpy(), [0, 1, 2])


def test_cumulative_average_counts_each_row_separately():
    rng = np.random.default_rng(1)
    bn = nn.BatchNorm1d(C, momentum=None, per_step=2, dtype=tm.float64)
    xs = [tm.tensor(rng.normal(size=(5, C))) for _ in range(3)]
    with nn.inner_step(0):
        for x in xs:
            bn(x)
    with nn.inner_step(1):
        bn(xs[0])
    expected0 = np.mean([x.numpy().mean(0) for x in xs], axis=0)
    np.testing.assert_allclose(bn.running_mean.numpy()[0], expected0)
    np.testing.assert_allclose(bn.running_mean.numpy()[1], xs[0].numpy().mean(0))


def test_eval_reads_the_current_rows_statistics():
    rng = np.random.default_rng(2)
    bn = nn.BatchNorm1d(C, per_step=2, dtype=tm.float64).eval()
    bn.running_mean.data[:] = rng.normal(size=(2, C))
    bn.running_var.data[:] = rng.uniform(0.5, 2.0, size=(2, C))
    x = tm.tensor(rng.normal(size=(5, C)))
    for row in (0, 1):
        with nn.inner_step(row):
            y = bn(x).numpy()
        expected = F.batch_norm(
            x, bn.running_mean.numpy()[row], bn.running_var.numpy()[row], training=False
        ).numpy()
        np.testing.assert_allclose(y, expected)
    # The two rows differ, so reading the wrong one would be caught.
    assert not np.allclose(bn.running_mean.numpy()[0], bn.running_mean.numpy()[1])


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_loss_fills_row_k_with_the_statistics_after_k_updates(steps):
    model = net(per_step=steps + 1)
    params = dict(model.named_parameters())
    xs, ys = data(1)
    xq, yq = data(2)

    def forward(p, x):
        return nn.functional_call(model, p, x)

    meta = maml_loss(
        forward, params, (xs[None], ys[None]), (xq[None], yq[None]), F.mse_loss,
        rule=0.1, steps=steps, vectorized=False,
    )  # fmt: skip
    meta.backward()
    # Recompute the trajectory with fresh rows (it does not depend on the running statistics).
    path = adapt(lambda p: F.mse_loss(forward(p, xs), ys), params, 0.1, steps, trajectory=True)
    rows = model[1].running_mean.numpy(), model[1].running_var.numpy()
    for k in range(steps):  # the support forward of step k saw the parameters after k updates
        mean, var = first_layer_stats(path[k], xs.numpy())
        np.testing.assert_allclose(rows[0][k], mean, rtol=1e-10)
        np.testing.assert_allclose(rows[1][k], var, rtol=1e-10)
    mean, var = first_layer_stats(path[steps], xq.numpy())  # the query forward: the last row
    np.testing.assert_allclose(rows[0][steps], mean, rtol=1e-10)
    np.testing.assert_allclose(rows[1][steps], var, rtol=1e-10)
    assert all(p.grad is not None for p in model.parameters())


def test_learner_forward_uses_the_row_of_its_update_count():
    model = net(per_step=3)
    learner = MAML(model, lr=0.1).clone()
    xs, ys = data(3)
    learner.adapt(F.mse_loss(learner(xs), ys))  # row 0
    learner(xs)  # after one update: row 1
    np.testing.assert_array_equal(model[1].num_batches_tracked.numpy(), [1, 1, 0])
    mean, _ = first_layer_stats(learner.params, xs.numpy())
    np.testing.assert_allclose(model[1].running_mean.numpy()[1], mean, rtol=1e-10)
