"""``tm.testing.check_meta_grads``: it passes correct meta-learning programs and catches bugs.

For every inner rule tinymeta ships (MAML through ``maml_loss`` looped and vectorized and
through ``MAML.clone().adapt``, Meta-SGD, PerStepLR, the learned optimizer, per-step batch
norm) a correct program must pass, with second-order terms large enough that a silently
first-order meta-gradient would fail. For each diagnosis a planted bug must be reported as
that diagnosis: a missing ``create_graph=True`` (first order), a detached parameter and a
learned rate that receives no gradient (cut from the graph), a wrong update rule (a plain
mismatch naming the parameter), and a meta-loss that is not deterministic.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta import nn
from tinymeta.data import SinusoidTasks
from tinymeta.meta import MAML, LearnedOptimizer, MetaSGD, PerStepLR, maml_loss
from tinymeta.testing import (
    assert_meta_grads_close,
    check_meta_grads,
    check_task_independence,
    first_order_inner_grads,
)
from tinymeta.testing.meta_check import FIRST_ORDER_DIAGNOSIS

ROOT = Path(__file__).resolve().parents[1]
LR = 0.3  # large enough that the second-order terms are far above the tolerance


class Tanh(nn.Module):
    def forward(self, x):
        return tm.tanh(x)


def mlp(device="cpu", seed=0):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(
        nn.Linear(1, 6, rng=rng, dtype=tm.float64),
        Tanh(),
        nn.Linear(6, 1, rng=rng, dtype=tm.float64),
    )
    return model.to(device)


def sinusoids(device="cpu", num_tasks=2, seed=1):
    """((xs, ys), (xq, yq)): float64 tensors of shape (T, 5, 1) on ``device``."""
    batch = SinusoidTasks(rng=seed).sample_batch(num_tasks, 5, 5)
    xs, ys, xq, yq = (tm.tensor(np.asarray(a), dtype=tm.float64, device=device) for a in batch)
    return (xs, ys), (xq, yq)


def functional(model):
    return lambda p, x: nn.functional_call(model, p, x)


def hand_written_maml(model, support, query, create_graph=True, lr=LR, steps=2):
    """MAML's meta-loss written out by hand: a loop over tasks, a loop over inner steps."""
    (xs, ys), (xq, yq) = support, query
    forward = functional(model)

    def meta_loss(params):
        total = 0.0
        for t in range(len(xs)):
            fast = dict(params)
            for _ in range(steps):
                loss = F.mse_loss(forward(fast, xs[t]), ys[t])
                grads = tm.grad(loss, list(fast.values()), create_graph=create_graph)
                fast = {k: p - lr * g for (k, p), g in zip(fast.items(), grads)}
            total = total + F.mse_loss(forward(fast, xq[t]), yq[t])
        return total / len(xs)

    return meta_loss


def assert_passes_and_is_second_order(meta_loss, params, **options):
    result = assert_meta_grads_close(meta_loss, params, **options)
    assert result.ok and result.failed == []
    assert result.second_order_seen, "the first-order approximation would pass too"
    assert set(result.params) == set(params if isinstance(params, dict) else result.params)
    return result


# --- correct programs pass ------------------------------------------------------------------


def test_hand_written_second_order_maml_passes():
    model = mlp()
    result = assert_passes_and_is_second_order(
        hand_written_maml(model, *sinusoids()), dict(model.named_parameters())
    )
    assert "matches finite differences" in result.diagnosis
    for check in result.params.values():
        assert check.status == "ok"
        np.testing.assert_allclose(check.analytic, check.numerical, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("vectorized", [False, True], ids=["looped", "vectorized"])
def test_maml_loss_passes(vectorized, device):
    model = mlp(device)
    support, query = sinusoids(device)

    def meta_loss(params):
        return maml_loss(
            functional(model), params, support, query, F.mse_loss, LR, steps=2,
            vectorized=vectorized,
        )  # fmt: skip

    assert_passes_and_is_second_order(meta_loss, dict(model.named_parameters()))


def test_maml_learner_passes():
    model = mlp()
    (xs, ys), (xq, yq) = sinusoids()
    maml = MAML(model, lr=LR)

    def meta_loss(params):  # the learner reads the model's parameters: the same tensors
        total = 0.0
        for t in range(len(xs)):
            learner = maml.clone()
            for _ in range(2):
                learner.adapt(F.mse_loss(learner(xs[t]), ys[t]))
            total = total + F.mse_loss(learner(xq[t]), yq[t])
        return total / len(xs)

    assert_passes_and_is_second_order(meta_loss, dict(model.named_parameters()))


def rule_meta_loss(model, rule, vectorized, steps=2):
    """The rule's rates are in the checked params too; they reach the loss through ``rule``."""
    support, query = sinusoids()
    names = [k for k, _ in model.named_parameters()]

    def meta_loss(params):
        return maml_loss(
            functional(model), {k: params[k] for k in names}, support, query, F.mse_loss, rule,
            steps, vectorized=vectorized,
        )  # fmt: skip

    return meta_loss


@pytest.mark.parametrize("vectorized", [False, True], ids=["looped", "vectorized"])
def test_meta_sgd_passes_with_its_rates(vectorized):
    model = mlp()
    params = dict(model.named_parameters())
    rule = MetaSGD(params, init_lr=LR)
    checked = {**params, **rule.named_parameters()}
    result = assert_passes_and_is_second_order(rule_meta_loss(model, rule, vectorized), checked)
    assert {"lr.0.weight", "lr.2.bias"} <= set(result.params)


@pytest.mark.parametrize("vectorized", [False, True], ids=["looped", "vectorized"])
def test_per_step_lr_passes_with_its_rates(vectorized):
    model = mlp()
    params = dict(model.named_parameters())
    rule = PerStepLR(params, steps=2, init_lr=LR)
    checked = {**params, **rule.named_parameters()}
    result = assert_passes_and_is_second_order(rule_meta_loss(model, rule, vectorized), checked)
    # Each rate is a scalar: its one probe is the exact derivative.
    assert result.params["lr.1.0.bias"].elements == [()]


@pytest.mark.parametrize(
    "per_coordinate, vectorized", [(False, True), (True, True), (True, False)],
    ids=["shared-rate", "per-coordinate", "per-coordinate-looped"],
)  # fmt: skip
def test_learned_optimizer_passes_with_its_weights(per_coordinate, vectorized):
    model = mlp()
    params = dict(model.named_parameters())
    rule = LearnedOptimizer(
        lr=LR, hidden=4, rng=0, dtype=tm.float64, params=params if per_coordinate else None
    )
    rule.weights["scale"].data = np.array(0.5)  # the MLP's correction on (0 at initialisation)
    checked = {**params, **rule.named_parameters()}
    result = assert_passes_and_is_second_order(rule_meta_loss(model, rule, vectorized), checked)
    assert result.params["learned_opt.w1"].status == "ok"
    assert np.abs(result.params["learned_opt.w1"].numerical).max() > 1e-4


def per_step_bn_net(steps, seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, rng=rng, dtype=tm.float64),
        nn.BatchNorm2d(2, per_step=steps + 1, dtype=tm.float64),
        Tanh(),
        nn.Flatten(-3),  # from the end: a leading task axis stays
        nn.Linear(2 * 3 * 3, 2, rng=rng, dtype=tm.float64),
    )


def image_tasks(num_tasks=2, n=4, seed=0):
    """Two-class 1x5x5 images (class 1 brighter in the centre), labels 0, 1, 0, 1, ..."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (num_tasks, 2 * n, 1, 5, 5))
    y = np.tile(np.arange(2), (num_tasks, n))
    x[..., 1:4, 1:4] += 0.8 * y[..., None, None, None]
    return (tm.tensor(x[:, :n]), tm.tensor(y[:, :n])), (tm.tensor(x[:, n:]), tm.tensor(y[:, n:]))


@pytest.mark.parametrize("vectorized", [False, True], ids=["looped", "vectorized"])
def test_per_step_batch_norm_passes(vectorized):
    steps = 2
    model = per_step_bn_net(steps)
    support, query = image_tasks()

    def cross_entropy(logits, labels):  # over all tasks' examples when there is a task axis
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def meta_loss(params):
        return maml_loss(
            functional(model), params, support, query, cross_entropy, 0.5, steps,
            vectorized=vectorized,
        )  # fmt: skip

    assert_passes_and_is_second_order(meta_loss, dict(model.named_parameters()), directions=2)
    assert model[1].num_batches_tracked.numpy().min() > 0  # every step's row was used


def test_full_mode_probes_every_element():
    model = mlp()
    params = dict(model.named_parameters())
    result = assert_passes_and_is_second_order(
        hand_written_maml(model, *sinusoids(), steps=1), params, full=True
    )
    check = result.params["0.weight"]
    assert check.elements == [(i, 0) for i in range(6)]
    (expected,) = tm.grad(
        hand_written_maml(model, *sinusoids(), steps=1)(params), [params["0.weight"]]
    )
    np.testing.assert_allclose(check.analytic, expected.numpy().ravel(), rtol=1e-12)


def test_params_may_be_a_list_and_meta_loss_may_close_over_them():
    model = mlp()
    meta_loss = hand_written_maml(model, *sinusoids())
    params = list(model.parameters())
    result = assert_passes_and_is_second_order(
        lambda ps: meta_loss(dict(model.named_parameters())), params
    )
    assert list(result.params) == [f"params[{i}]" for i in range(len(params))]


def test_parameters_are_restored_after_the_check():
    model = mlp()
    before = {k: v.numpy().copy() for k, v in model.named_parameters()}
    objects = {k: id(v.data) for k, v in model.named_parameters()}
    check_meta_grads(hand_written_maml(model, *sinusoids()), dict(model.named_parameters()))
    for k, v in model.named_parameters():
        np.testing.assert_array_equal(v.numpy(), before[k])
        assert id(v.data) == objects[k]


# --- planted bugs are caught, with the right diagnosis --------------------------------------


def test_missing_create_graph_is_diagnosed_as_first_order(device):
    model = mlp(device)
    support, query = sinusoids(device)
    params = dict(model.named_parameters())
    result = check_meta_grads(hand_written_maml(model, support, query, create_graph=False), params)
    assert not result.ok
    assert FIRST_ORDER_DIAGNOSIS in result.diagnosis
    assert {c.status for c in result.params.values()} <= {"first-order", "ok"}
    assert result.worst.status == "first-order"
    with pytest.raises(AssertionError) as info:
        assert_meta_grads_close(hand_written_maml(model, support, query, False), params)
    message = str(info.value)
    assert FIRST_ORDER_DIAGNOSIS in message
    assert f"worst parameter: {result.worst.name!r}" in message
    worst = result.worst
    i = worst.worst
    assert f"meta-gradient {worst.analytic[i]:.8g}" in message
    assert f"finite difference {worst.numerical[i]:.8g}" in message


def test_fomaml_checked_as_maml_is_diagnosed_as_first_order():
    model = mlp()
    support, query = sinusoids()

    def meta_loss(params):
        return maml_loss(functional(model), params, support, query, F.mse_loss, LR, 2, True)

    result = check_meta_grads(meta_loss, dict(model.named_parameters()))
    assert not result.ok and FIRST_ORDER_DIAGNOSIS in result.diagnosis


def test_detached_body_is_named_as_cut_from_the_graph():
    model = mlp()
    (xs, ys), (xq, yq) = sinusoids()
    forward = functional(model)

    def meta_loss(params):  # ANIL with a bug: the body is detached for the inner loop
        body = {k: params[k].detach() for k in ("0.weight", "0.bias")}
        head = {k: params[k] for k in ("2.weight", "2.bias")}
        total = 0.0
        for t in range(len(xs)):
            loss = F.mse_loss(forward({**body, **head}, xs[t]), ys[t])
            grads = tm.grad(loss, list(head.values()), create_graph=True)
            fast = {k: p - LR * g for (k, p), g in zip(head.items(), grads)}
            total = total + F.mse_loss(forward({**body, **fast}, xq[t]), yq[t])
        return total / len(xs)

    result = check_meta_grads(meta_loss, dict(model.named_parameters()))
    assert not result.ok
    statuses = {k: c.status for k, c in result.params.items()}
    assert statuses == {"0.weight": "cut", "0.bias": "cut", "2.weight": "ok", "2.bias": "ok"}
    assert "cut from the graph: '0.weight', '0.bias'" in result.diagnosis
    assert result.params["0.weight"].gradient_is_none
    assert "meta-gradient None" in result.report()


def test_inner_loop_on_detached_copies_cuts_every_parameter():
    model = mlp()
    (xs, ys), (xq, yq) = sinusoids()
    forward = functional(model)

    def meta_loss(params):  # a classic: "fresh leaves for the inner loop"
        fast = {k: p.detach().requires_grad_() for k, p in params.items()}
        loss = F.mse_loss(forward(fast, xs[0]), ys[0])
        grads = tm.grad(loss, list(fast.values()), create_graph=True)
        fast = {k: p - LR * g for (k, p), g in zip(fast.items(), grads)}
        return F.mse_loss(forward(fast, xq[0]), yq[0])

    result = check_meta_grads(meta_loss, dict(model.named_parameters()))
    assert {c.status for c in result.params.values()} == {"cut"}


class FrozenRateSGD:
    """Meta-SGD with a bug: the learned rates are read through ``.data`` (no gradient)."""

    def __init__(self, params):
        self.rule = MetaSGD(params, init_lr=LR)

    def __call__(self, params, grads, step, state):
        return {k: params[k] - self.rule.lrs[k].data * grads[k] for k in grads}

    def named_parameters(self):
        return self.rule.named_parameters()


def test_learned_rate_without_gradient_is_named():
    model = mlp()
    params = dict(model.named_parameters())
    rule = FrozenRateSGD(params)
    checked = {**params, **rule.named_parameters()}
    result = check_meta_grads(rule_meta_loss(model, rule, vectorized=False), checked)
    assert not result.ok
    cut = sorted(k for k, c in result.params.items() if c.status == "cut")
    assert cut == sorted(rule.named_parameters())
    assert all(result.params[k].status == "ok" for k in params)  # the model's are still right
    assert "cut from the graph: 'lr.0.weight'" in result.diagnosis


class DoubledRateSGD:
    """A wrong rule: it steps by 2 * lr, but the gradient w.r.t. lr is that of a step by lr
    (the doubling is added as a constant)."""

    def __init__(self, params):
        self.rule = MetaSGD(params, init_lr=LR / 2)

    def __call__(self, params, grads, step, state):
        out = {}
        for k in grads:
            lr = self.rule.lrs[k]
            out[k] = params[k] - (lr + lr.detach()) * grads[k]
        return out

    def named_parameters(self):
        return self.rule.named_parameters()


def test_wrong_update_rule_is_a_plain_mismatch_naming_the_parameter():
    model = mlp()
    params = dict(model.named_parameters())
    rule = DoubledRateSGD(params)
    checked = {**params, **rule.named_parameters()}
    result = check_meta_grads(rule_meta_loss(model, rule, vectorized=True), checked)
    assert not result.ok
    assert all(result.params[k].status == "ok" for k in params)
    assert all(result.params[k].status == "mismatch" for k in rule.named_parameters())
    assert FIRST_ORDER_DIAGNOSIS not in result.diagnosis
    assert "not the first-order approximation either" in result.diagnosis
    with pytest.raises(AssertionError, match=r"worst parameter: 'lr\.") as info:
        assert_meta_grads_close(rule_meta_loss(model, rule, vectorized=True), checked)
    assert "mismatch" in str(info.value)


def test_a_random_meta_loss_is_reported_as_not_deterministic():
    model = mlp()
    rng = np.random.default_rng(0)
    meta_loss = hand_written_maml(model, *sinusoids())

    def noisy(params):
        return meta_loss(params) + float(rng.normal()) * 1e-3

    result = check_meta_grads(noisy, dict(model.named_parameters()))
    assert not result.ok
    assert "not deterministic" in result.diagnosis


def test_a_parameter_meta_loss_ignores_is_unused_not_a_failure():
    model = mlp()
    extra = tm.tensor([1.0, 2.0], dtype=tm.float64, requires_grad=True)
    params = {**dict(model.named_parameters()), "extra": extra}
    result = check_meta_grads(lambda p: hand_written_maml(model, *sinusoids())(
        {k: v for k, v in p.items() if k != "extra"}), params)  # fmt: skip
    assert result.ok
    assert result.params["extra"].status == "unused"


# --- tasks of a meta-batch must not see each other ---------------------------------------------


def select(batch, tasks):
    (xs, ys), (xq, yq) = batch
    index = np.asarray(tasks)
    return (tm.tensor(xs.data[index]), tm.tensor(ys.data[index])), (
        tm.tensor(xq.data[index]),
        tm.tensor(yq.data[index]),
    )


@pytest.mark.parametrize("vectorized", [False, True], ids=["looped", "vectorized"])
def test_per_step_batch_norm_keeps_tasks_independent(vectorized):
    model = per_step_bn_net(steps=1)
    batch = image_tasks(num_tasks=3)

    def cross_entropy(logits, labels):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def meta_loss(params, tasks):
        support, query = select(batch, tasks)
        return maml_loss(
            functional(model), params, support, query, cross_entropy, 0.5, 1,
            vectorized=vectorized,
        )  # fmt: skip

    result = check_task_independence(meta_loss, dict(model.named_parameters()), num_tasks=3)
    assert result.ok, result.diagnosis
    assert len(result.task_losses) == 3 and len(set(result.task_losses)) == 3


def normalised_net(over_tasks: bool):
    """A tanh MLP with a hand-written normalisation of its hidden layer, over each task's
    examples (right) or over the whole flattened meta-batch (the leak)."""
    axes = (0, 1) if over_tasks else (-2,)

    def forward(p, x):
        h = x @ tm.swapaxes(p["w1"], -1, -2)
        h = (h - h.mean(axis=axes, keepdims=True)) / tm.sqrt(h.var(axis=axes, keepdims=True) + 1e-5)
        return tm.tanh(h) @ tm.swapaxes(p["w2"], -1, -2)

    rng = np.random.default_rng(0)
    params = {
        "w1": tm.tensor(rng.normal(size=(4, 1)), requires_grad=True),
        "w2": tm.tensor(rng.normal(size=(1, 4)), requires_grad=True),
    }
    return forward, params


@pytest.mark.parametrize("over_tasks", [False, True], ids=["per-task", "leaking"])
def test_statistics_over_the_meta_batch_are_caught_as_a_leak(over_tasks):
    forward, params = normalised_net(over_tasks)
    batch = sinusoids(num_tasks=3)

    def meta_loss(params, tasks):
        support, query = select(batch, tasks)
        return maml_loss(forward, params, support, query, F.mse_loss, LR, 1, vectorized=True)

    result = check_task_independence(meta_loss, params, num_tasks=3)
    assert result.ok == (not over_tasks), result.diagnosis
    if over_tasks:
        assert "not independent" in result.diagnosis
        assert set(result.gradient_errors) == {"w1", "w2"}
    # The leak is invisible to finite differences: the gradient of what is computed is right.
    assert check_meta_grads(lambda p: meta_loss(p, [0, 1, 2]), params).ok


def test_task_independence_needs_two_tasks():
    _, params = normalised_net(False)
    with pytest.raises(ValueError, match="num_tasks must be an int >= 2, got 1"):
        check_task_independence(lambda p, tasks: None, params, num_tasks=1)


# --- first_order_inner_grads: the mode the diagnosis re-runs meta_loss in ---------------------


def test_first_order_mode_makes_inner_gradients_constants():
    x = tm.tensor(2.0, dtype=tm.float64, requires_grad=True)
    with first_order_inner_grads():
        (g,) = tm.grad(x**3, [x], create_graph=True)
        assert not g.requires_grad and float(g) == 12.0
        y = x**3
        y.backward(create_graph=True)
        assert not x.grad.requires_grad and float(x.grad) == 12.0
    (g,) = tm.grad(x**3, [x], create_graph=True)
    assert g.requires_grad  # the mode ends with the block


def test_first_order_mode_keeps_the_graph_as_create_graph_would():
    x = tm.tensor(2.0, dtype=tm.float64, requires_grad=True)
    with first_order_inner_grads():
        y = x**3
        (g,) = tm.grad(y, [x], create_graph=True)
        (again,) = tm.grad(y, [x])  # retain_graph defaulted to True: the graph is still there
    assert float(again) == float(g) == 12.0


def test_first_order_mode_ends_on_an_exception():
    with pytest.raises(ValueError), first_order_inner_grads():
        raise ValueError("boom")
    x = tm.tensor(2.0, dtype=tm.float64, requires_grad=True)
    (g,) = tm.grad(x**2, [x], create_graph=True)
    assert g.requires_grad


def test_first_order_meta_gradient_equals_fomaml():
    model = mlp()
    support, query = sinusoids()
    params = dict(model.named_parameters())

    def loss(first_order):
        return maml_loss(functional(model), params, support, query, F.mse_loss, LR, 2, first_order)

    with first_order_inner_grads():
        under_mode = tm.grad(loss(False), list(params.values()))
    fomaml = tm.grad(loss(True), list(params.values()))
    for a, b in zip(under_mode, fomaml):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)


# --- bad arguments ---------------------------------------------------------------------------


def test_float32_parameters_are_refused_naming_them():
    w = tm.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(TypeError, match=r"params\['w'\] has dtype float32 .*float64"):
        check_meta_grads(lambda p: (p["w"] ** 2).sum(), {"w": w})


def test_bad_params_and_options_raise_clear_errors():
    w = tm.tensor([1.0, 2.0], dtype=tm.float64, requires_grad=True)
    with pytest.raises(TypeError, match="params must be a dict"):
        check_meta_grads(lambda p: p.sum(), w)
    with pytest.raises(ValueError, match="params is empty"):
        check_meta_grads(lambda p: None, {})
    with pytest.raises(TypeError, match=r"params\[1\] is a ndarray"):
        check_meta_grads(lambda p: None, [w, np.ones(2)])
    with pytest.raises(ValueError, match=r"params\['v'\] .* leaf that requires grad"):
        check_meta_grads(lambda p: None, {"v": w * 2})
    with pytest.raises(ValueError, match=r"params\['b'\] is the same tensor as params\['a'\]"):
        check_meta_grads(lambda p: None, {"a": w, "b": w})
    with pytest.raises(ValueError, match="directions must be an int >= 1, got 0"):
        check_meta_grads(lambda p: p["w"].sum(), {"w": w}, directions=0)
    with pytest.raises(ValueError, match="eps must be positive"):
        check_meta_grads(lambda p: p["w"].sum(), {"w": w}, eps=0.0)


def test_meta_loss_must_return_a_scalar_tensor():
    w = tm.tensor([1.0, 2.0], dtype=tm.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"shape \(2,\), expected a scalar"):
        check_meta_grads(lambda p: p["w"] * 2, {"w": w})
    with pytest.raises(TypeError, match="returned a float"):
        check_meta_grads(lambda p: 1.0, {"w": w})


# --- the guide tells the truth ------------------------------------------------------------------


def _rounded(text: str) -> str:
    """``text`` with every decimal number to 4 significant digits (BLAS may move the last ones)."""
    return re.sub(r"-?\d+\.\d+(?:e[-+]\d+)?", lambda m: f"{float(m.group()):.4g}", text)


def test_the_guide_shows_the_example_script_and_its_real_output():
    script = ROOT / "examples" / "check_meta_gradient.py"
    code = script.read_text().split('"""', 2)[2].lstrip()  # the script after its docstring
    guide = (ROOT / "docs" / "checking-meta-gradients.md").read_text()
    assert code in re.findall(r"```python\n(.*?)```", guide, flags=re.S)

    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    buggy, fixed = run.stdout.split("\n\n")
    assert "FAILED" in buggy and FIRST_ORDER_DIAGNOSIS in buggy
    assert fixed.startswith("meta-gradient check passed")
    (pasted,) = re.findall(r"```text\n(.*?)```", guide, flags=re.S)
    assert _rounded(pasted) == _rounded(run.stdout)
