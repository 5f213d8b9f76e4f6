"""meta.LSTMOptimizer: the paper's gradient preprocessing, the update as an inner rule of
MAML (second-order meta-gradient through it against finite differences), per-inner-loop
state, and meta-training that lowers the loss of random quadratics."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tinymeta as tm
from tinymeta import meta, nn
from tinymeta.meta.lstm_optimizer import preprocess_gradient
from tinymeta.testing import check_grads


def test_preprocessing_follows_the_paper_and_has_finite_gradients_at_zero():
    g_np = np.array([3.0, -2e-3, 1e-6, 0.0, -1e-5])
    g = tm.tensor(g_np, requires_grad=True)
    features = preprocess_gradient(g)
    big = np.abs(g_np) >= math.exp(-10)
    want_first = np.where(big, np.log(np.maximum(np.abs(g_np), 1e-30)) / 10, -1.0)
    want_second = np.where(big, np.sign(g_np), math.exp(10) * g_np)
    np.testing.assert_allclose(features.numpy()[:, 0], want_first, rtol=1e-12)
    np.testing.assert_allclose(features.numpy()[:, 1], want_second, rtol=1e-12)
    (grad,) = tm.grad(features.sum(), g)
    assert np.isfinite(grad.numpy()).all()
    np.testing.assert_allclose(grad.numpy()[big], 1 / (10 * g_np[big]), rtol=1e-12)
    np.testing.assert_allclose(grad.numpy()[~big], math.exp(10), rtol=1e-12)


def test_the_update_is_differentiable_to_second_order_in_weights_and_gradient():
    opt = meta.LSTMOptimizer(hidden=3, rng=0, dtype=np.float64)
    checked = ["weight_ih_l0", "weight_hh_l1", "out.weight"]  # one of each kind, both layers
    g = np.array([[0.5, -0.3], [0.8, 0.2]])

    def fn(grad, *weights):
        opt.weights.update(zip(checked, weights))
        first, state = opt.update(grad, None)
        second, _ = opt.update(grad * 2.0, state)  # through the LSTM's memory
        return first + second

    assert check_grads(fn, [g, *[opt.weights[k].numpy() for k in checked]], order=2)


def test_maml_meta_gradient_through_the_lstm_optimizer_matches_finite_differences():
    rng = np.random.default_rng(0)
    model = nn.Linear(2, 1, dtype="float64", rng=rng)
    opt = meta.LSTMOptimizer(hidden=3, rng=1, dtype=np.float64)
    xs, xq = rng.standard_normal((2, 3, 4, 2))
    ys, yq = rng.standard_normal((2, 3, 4, 1))
    names = list(opt.weights)

    def meta_loss(*weights):
        opt.weights = dict(zip(names, weights))
        params = dict(model.named_parameters())

        def forward(p, x):
            return nn.functional_call(model, p, x)

        def mse(a, b):
            return ((a - b) ** 2).mean()

        with tm.enable_grad():
            data = [tm.tensor(a) for a in (xs, ys, xq, yq)]
            return meta.maml_loss(forward, params, data[:2], data[2:], mse, opt, steps=2)

    assert check_grads(meta_loss, [w.numpy() for w in opt.parameters()], order=1)


def test_state_belongs_to_one_inner_loop_and_task_axis_shapes_work():
    opt = meta.LSTMOptimizer(rng=0)
    params = {"w": tm.tensor(np.ones((4, 3, 2), np.float32))}  # a leading task axis of 4
    grads = {"w": tm.tensor(np.full((4, 3, 2), 0.1, np.float32))}
    state_a, state_b = {}, {}
    first = opt(params, grads, 0, state_a)
    assert first["w"].shape == (4, 3, 2)
    assert len(state_a["w"]) == 2 and state_a["w"][0][0].shape == (24, 20)
    again = opt(params, grads, 0, state_b)  # a fresh loop starts from zero state
    np.testing.assert_array_equal(again["w"].numpy(), first["w"].numpy())
    later = opt(params, grads, 1, state_a)  # the same loop remembers its first step
    assert not np.allclose(later["w"].numpy(), first["w"].numpy())
    assert len(opt.parameters()) == 10 and all(p.requires_grad for p in opt.parameters())


@pytest.mark.slow
def test_meta_training_lowers_the_loss_on_random_quadratics():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "lstm_optimizer_quadratic.py"
    spec = importlib.util.spec_from_file_location("lstm_optimizer_quadratic", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rng = np.random.default_rng(0)
    opt = meta.LSTMOptimizer(rng=rng)
    unseen = example.sample_functions(np.random.default_rng(5), 64)
    with tm.no_grad():
        before = example.lstm_trajectory(opt, unseen, 20).mean()
    outer = tm.optim.Adam(opt.parameters(), lr=3e-3)
    for _ in range(25):
        example.lstm_trajectory(opt, example.sample_functions(rng, 32), 20, 10, outer)
    with tm.no_grad():
        after = example.lstm_trajectory(opt, unseen, 20).mean()
    assert after < 0.7 * before
