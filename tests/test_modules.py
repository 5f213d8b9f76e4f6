"""tinymeta.nn modules: registration, initialisation, state_dict, train/eval,
functional_call (what MAML differentiates through) and clip_grad_norm_."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import tinymeta as tm
import tinymeta.nn as nn
import tinymeta.nn.functional as F
from tinymeta.nn import init
from tinymeta.testing import check_grads


class Block(nn.Module):
    """A parameter of its own, a submodule, a buffer and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(tm.ones(3))
        self.lin = nn.Linear(3, 2, rng=np.random.default_rng(0))
        self.register_buffer("count", tm.zeros(1))
        self.register_buffer("scratch", tm.zeros(2), persistent=False)

    def forward(self, x):
        return self.lin(x * self.scale)


def mlp(rng=None, dtype=None):
    rng = np.random.default_rng(0) if rng is None else rng
    return nn.Sequential(
        nn.Linear(1, 8, rng=rng, dtype=dtype),
        nn.ReLU(),
        nn.Linear(8, 8, rng=rng, dtype=dtype),
        nn.ReLU(),
        nn.Linear(8, 1, rng=rng, dtype=dtype),
    )


def cnn(rng=None):
    rng = np.random.default_rng(0) if rng is None else rng
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, rng=rng),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 4, rng=rng),
    )


def snapshot(module):
    return {k: (p, p.numpy().copy()) for k, p in module.named_parameters()}


def assert_untouched(module, snap):
    for k, p in module.named_parameters():
        orig, values = snap[k]
        assert p is orig, f"{k} was replaced"
        np.testing.assert_array_equal(p.numpy(), values, err_msg=k)
        assert p.grad is None, f"{k} got a gradient"


# --- Parameter and registration --------------------------------------------------------------


def test_parameter_defaults_and_sharing():
    a = np.zeros(3, dtype=np.float32)
    p = nn.Parameter(a)
    assert p.requires_grad and p.is_leaf and isinstance(p, tm.Tensor)
    a[0] = 5
    assert p.numpy()[0] == 5  # shares memory, as PyTorch's Parameter(t) does
    assert type(p * 2) is tm.Tensor
    assert type(p.detach()) is tm.Tensor
    assert not nn.Parameter(tm.ones(2), requires_grad=False).requires_grad
    assert nn.Parameter([1.0, 2.0]).dtype == tm.float32
    assert repr(p).startswith("Parameter containing:\ntensor(")


def test_registration_names_and_order():
    b = Block()
    assert [k for k, _ in b.named_parameters()] == ["scale", "lin.weight", "lin.bias"]
    assert [k for k, _ in b.named_buffers()] == ["count", "scratch"]
    assert list(b.state_dict()) == ["scale", "count", "lin.weight", "lin.bias"]  # not scratch
    assert [k for k, _ in b.named_modules()] == ["", "lin"]
    assert list(b.children()) == [b.lin]
    assert b.lin.weight.shape == (2, 3)
    assert "lin" in dir(b) and "scale" in dir(b)


def test_assignment_rules():
    b = Block()
    with pytest.raises(TypeError, match="cannot assign a Tensor to parameter 'scale' of Block"):
        b.scale = tm.ones(3)
    b.scale = None  # allowed: the slot stays, without a tensor
    assert b.scale is None and [k for k, _ in b.named_parameters()] == ["lin.weight", "lin.bias"]
    b.scale = nn.Parameter(tm.ones(3))
    b.count = tm.ones(1)  # a buffer can be replaced by another tensor
    assert b.count.numpy()[0] == 1 and "count" in dict(b.named_buffers())
    with pytest.raises(TypeError, match="buffer 'count'"):
        b.count = np.ones(1)
    b.other = 3  # plain attributes are plain
    assert b.other == 3
    del b.lin
    assert not hasattr(b, "lin") and [k for k, _ in b.named_parameters()] == ["scale"]
    with pytest.raises(AttributeError, match="'Block' object has no attribute 'nope'"):
        b.nope  # noqa: B018


def test_assigning_before_init_is_a_clear_error():
    class Broken(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(tm.ones(1))

    with pytest.raises(AttributeError, match=r"Broken: call super\(\).__init__\(\) before"):
        Broken()


def test_shared_parameters_are_listed_once():
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert [k for k, _ in model.named_parameters()] == ["0.weight", "0.bias"]
    assert len(list(model.parameters())) == 2
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_sequential_indexing_and_names():
    a, b, c = nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1)
    seq = nn.Sequential(a, b, c)
    assert len(seq) == 3 and seq[0] is a and seq[-1] is c and list(seq) == [a, b, c]
    sub = seq[1:]
    assert isinstance(sub, nn.Sequential) and list(sub._modules) == ["1", "2"]
    with pytest.raises(IndexError, match="out of range for 3 modules"):
        seq[3]
    seq.append(nn.ReLU())
    assert [k for k, _ in seq.named_children()] == ["0", "1", "2", "3"]
    named = nn.Sequential({"enc": nn.Linear(1, 2), "act": nn.ReLU()})
    assert [k for k, _ in named.named_parameters()] == ["enc.weight", "enc.bias"]


def test_nested_repr():
    text = repr(cnn())
    assert text.splitlines()[0] == "Sequential("
    assert "(0): Conv2d(1, 3, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))" in text
    assert "(1): BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=True" in text
    assert "(5): Linear(in_features=12, out_features=4, bias=True)" in text
    assert repr(nn.ReLU()) == "ReLU()"
    nested = repr(nn.Sequential(nn.Sequential(nn.ReLU())))
    assert nested == "Sequential(\n  (0): Sequential(\n    (0): ReLU()\n  )\n)"


# --- initialisation ---------------------------------------------------------------------------


def test_default_init_follows_pytorch_bounds():
    lin = nn.Linear(50, 40, rng=np.random.default_rng(1))
    bound = 1 / math.sqrt(50)
    w, b = lin.weight.numpy(), lin.bias.numpy()
    assert w.dtype == np.float32 and np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound  # uniform: std = bound / sqrt(3)
    conv = nn.Conv2d(4, 6, (3, 2), rng=np.random.default_rng(1))
    assert conv.weight.shape == (6, 4, 3, 2)
    assert np.abs(conv.weight.numpy()).max() <= 1 / math.sqrt(4 * 3 * 2)
    bn = nn.BatchNorm2d(5)
    assert (bn.weight.numpy() == 1).all() and (bn.bias.numpy() == 0).all()
    assert (bn.running_mean.numpy() == 0).all() and (bn.running_var.numpy() == 1).all()
    assert nn.Linear(2, 3, bias=False).bias is None


def test_init_rng_and_manual_seed_reproduce():
    a = nn.Linear(3, 4, rng=np.random.default_rng(7))
    b = nn.Linear(3, 4, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a.weight.numpy(), b.weight.numpy())
    tm.manual_seed(3)
    c = nn.Conv2d(2, 2, 3)
    tm.manual_seed(3)
    d = nn.Conv2d(2, 2, 3)
    np.testing.assert_array_equal(c.weight.numpy(), d.weight.numpy())
    assert not np.array_equal(a.weight.numpy(), nn.Linear(3, 4).weight.numpy())
    assert nn.Linear(3, 4, dtype=tm.float64).weight.dtype == tm.float64


def test_init_functions():
    rng = np.random.default_rng(0)
    t = tm.zeros(200, 100)
    assert init.calculate_fan_in_and_fan_out(t) == (100, 200)
    assert init.calculate_fan_in_and_fan_out(tm.zeros(8, 4, 3, 3)) == (36, 72)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        init.calculate_fan_in_and_fan_out(tm.zeros(3))
    v0 = t._version
    init.kaiming_uniform_(t, a=0, nonlinearity="relu", rng=rng)
    assert t._version > v0
    assert np.abs(t.numpy()).max() <= math.sqrt(2) * math.sqrt(3 / 100)
    init.xavier_uniform_(t, rng=rng)
    assert np.abs(t.numpy()).max() <= math.sqrt(6 / 300)
    init.normal_(t, 2.0, 0.5, rng=rng)
    assert abs(t.numpy().mean() - 2.0) < 0.02 and abs(t.numpy().std() - 0.5) < 0.02
    init.uniform_(t, -1, 1, rng=rng)
    assert -1 <= t.numpy().min() and t.numpy().max() < 1
    assert (init.zeros_(t).numpy() == 0).all() and (init.ones_(t).numpy() == 1).all()
    p = nn.Parameter(tm.zeros(3, 3))  # in place under no_grad, even on a Parameter
    init.kaiming_uniform_(p, rng=rng)
    assert p.requires_grad and p.grad_fn is None


# --- state_dict ----------------------------------------------------------------------------------


def test_state_dict_is_a_snapshot_and_round_trips():
    model = cnn(np.random.default_rng(0))
    sd = model.state_dict()
    assert list(sd) == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked", "5.weight", "5.bias",
    ]  # fmt: skip
    assert all(type(v) is tm.Tensor and not v.requires_grad for v in sd.values())
    assert sd["1.num_batches_tracked"].dtype == tm.int64
    before = sd["0.weight"].numpy().copy()
    with tm.no_grad():
        model[0].weight.add_(1.0)
    np.testing.assert_array_equal(sd["0.weight"].numpy(), before)  # a snapshot
    assert model.state_dict(keep_vars=True)["0.weight"] is model[0].weight

    other = cnn(np.random.default_rng(1))
    weight = other[0].weight
    result = other.load_state_dict(sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert other[0].weight is weight  # identity kept, values copied
    np.testing.assert_array_equal(weight.numpy(), before)
    x = tm.randn(2, 1, 4, 4, rng=np.random.default_rng(2))
    model.load_state_dict(sd)
    model.eval(), other.eval()
    np.testing.assert_array_equal(model(x).numpy(), other(x).numpy())


def test_load_state_dict_accepts_arrays_and_casts():
    lin = nn.Linear(2, 2)
    lin.load_state_dict({"weight": np.eye(2), "bias": [1.0, 2.0]})
    assert lin.weight.dtype == tm.float32
    np.testing.assert_array_equal(lin.weight.numpy(), np.eye(2))
    np.testing.assert_array_equal(lin.bias.numpy(), [1, 2])


def test_load_state_dict_strict_errors_list_names_and_change_nothing():
    model = mlp()
    sd = model.state_dict()
    before = model[0].weight.numpy().copy()
    bad = dict(sd)
    del bad["2.bias"]
    bad["9.weight"] = np.zeros(1)
    bad["0.weight"] = np.ones((8, 1)) * 7
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(bad)
    msg = str(info.value)
    assert "Error(s) in loading state_dict for Sequential" in msg
    assert "missing key(s): 2.bias" in msg and "unexpected key(s): 9.weight" in msg
    np.testing.assert_array_equal(model[0].weight.numpy(), before)  # nothing copied

    shaped = dict(sd, **{"4.weight": np.zeros((2, 8))})
    with pytest.raises(
        RuntimeError, match=r"shape mismatch: 4.weight: checkpoint \(2, 8\) vs model \(1, 8\)"
    ):
        model.load_state_dict(shaped, strict=False)  # a shape mismatch raises even when lax

    result = model.load_state_dict(bad, strict=False)
    assert result.missing_keys == ["2.bias"] and result.unexpected_keys == ["9.weight"]
    np.testing.assert_array_equal(model[0].weight.numpy(), 7)


# --- modes, gradients, devices -------------------------------------------------------------------


def test_train_eval_switch_batch_norm_behaviour():
    rng = np.random.default_rng(0)
    bn = nn.BatchNorm2d(2, momentum=0.5)
    model = nn.Sequential(bn)
    x = tm.tensor((rng.standard_normal((4, 2, 3, 3)) * 3 + 5).astype(np.float32))
    assert model.training and bn.training
    y = model(x).numpy()
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)  # batch statistics
    mean = x.numpy().mean(axis=(0, 2, 3))
    var = x.numpy().var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(bn.running_mean.numpy(), 0.5 * mean, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), 0.5 + 0.5 * var, rtol=1e-5)
    assert bn.num_batches_tracked.item() == 1

    assert model.eval() is model and not bn.training
    stats = bn.running_mean.numpy().copy()
    y_eval = model(x).numpy()
    rm, rv = bn.running_mean.numpy(), bn.running_var.numpy()
    ref = (x.numpy() - rm[None, :, None, None]) / np.sqrt(rv[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(y_eval, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bn.running_mean.numpy(), stats)  # eval updates nothing
    assert bn.num_batches_tracked.item() == 1
    model.train()
    assert bn.training


def test_batch_norm_variants():
    x = tm.tensor(np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32))
    cumulative = nn.BatchNorm1d(3, momentum=None)
    cumulative(x)
    cumulative(x * 3)
    mean = (x.numpy().mean(0) + 3 * x.numpy().mean(0)) / 2  # the plain average of 2 batches
    np.testing.assert_allclose(cumulative.running_mean.numpy(), mean, rtol=1e-5)
    untracked = nn.BatchNorm1d(3, track_running_stats=False, affine=False).eval()
    assert list(untracked.named_parameters()) == [] and list(untracked.named_buffers()) == []
    np.testing.assert_allclose(untracked(x).numpy().mean(0), 0, atol=1e-5)  # batch stats in eval
    with pytest.raises(ValueError, match="BatchNorm2d: expected a 4 or 5-D input, got shape"):
        nn.BatchNorm2d(3)(x)


def test_zero_grad_and_requires_grad():
    model = mlp()
    F.mse_loss(model(tm.ones(4, 1)), tm.zeros(4, 1)).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=False)
    assert all((p.grad.numpy() == 0).all() for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in model.parameters())


def test_to_keeps_identity():
    model = cnn()
    params = list(model.parameters())
    assert model.to("cpu") is model and list(model.parameters()) == params
    model.to(tm.float64)
    assert all(p is q for p, q in zip(model.parameters(), params))
    assert all(p.dtype == tm.float64 for p in params)
    assert model[1].running_mean.dtype == tm.float64
    assert model[1].num_batches_tracked.dtype == tm.int64  # integers are not cast
    model.float()
    assert params[0].dtype == tm.float32
    with pytest.raises(ValueError, match="unknown device"):
        model.to("tpu")


def test_deepcopy_is_independent():
    model = cnn()
    clone = copy.deepcopy(model)
    assert clone[0].weight is not model[0].weight
    np.testing.assert_array_equal(clone[0].weight.numpy(), model[0].weight.numpy())
    with tm.no_grad():
        clone[0].weight.mul_(0.0)
    assert np.abs(model[0].weight.numpy()).sum() > 0
    assert isinstance(clone[0].weight, nn.Parameter) and clone[0].weight.requires_grad


def test_custom_module_trains():
    rng = np.random.default_rng(0)
    model = mlp(rng)
    x = tm.tensor(rng.uniform(-2, 2, (32, 1)).astype(np.float32))
    y = tm.tensor(np.sin(x.numpy()))
    first = None
    for _ in range(200):
        loss = F.mse_loss(model(x), y)
        first = loss.item() if first is None else first
        model.zero_grad()
        loss.backward()
        with tm.no_grad():
            for p in model.parameters():
                p.sub_(p.grad, alpha=0.05)
    assert loss.item() < 0.3 * first


# --- functional_call -----------------------------------------------------------------------------


def test_functional_call_with_own_params_equals_call_and_leaves_module_untouched():
    model = cnn()
    model.eval()
    x = tm.randn(2, 1, 4, 4, rng=np.random.default_rng(3))
    snap = snapshot(model)
    own = dict(model.named_parameters())
    np.testing.assert_array_equal(nn.functional_call(model, own, x).numpy(), model(x).numpy())
    assert_untouched(model, snap)


def test_functional_call_gradients_flow_to_the_dict_values():
    rng = np.random.default_rng(0)
    model = mlp(rng, dtype=tm.float64)
    snap = snapshot(model)
    x = tm.tensor(rng.standard_normal((5, 1)))
    target = tm.tensor(rng.standard_normal((5, 1)))
    params = {
        k: tm.tensor(p.numpy() * 1.5, requires_grad=True) for k, p in model.named_parameters()
    }
    loss = F.mse_loss(nn.functional_call(model, params, x), target)
    grads = tm.grad(loss, list(params.values()))

    # The same network written with F ops on the dict's tensors.
    def manual(p):
        h = F.relu(F.linear(x, p["0.weight"], p["0.bias"]))
        h = F.relu(F.linear(h, p["2.weight"], p["2.bias"]))
        return F.mse_loss(F.linear(h, p["4.weight"], p["4.bias"]), target)

    expected = tm.grad(manual(params), list(params.values()))
    np.testing.assert_allclose(loss.item(), manual(params).item())
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-12)
    assert_untouched(model, snap)


def test_functional_call_maml_second_order_against_finite_differences():
    """The meta-gradient of one inner SGD step through functional_call, checked to order 2."""
    rng = np.random.default_rng(1)
    model = mlp(rng, dtype=tm.float64)
    names = [k for k, _ in model.named_parameters()]
    xs, ys = tm.tensor(rng.standard_normal((4, 1))), tm.tensor(rng.standard_normal((4, 1)))
    xq, yq = tm.tensor(rng.standard_normal((4, 1))), tm.tensor(rng.standard_normal((4, 1)))
    snap = snapshot(model)

    def meta_loss(*values):
        # enable_grad: the check also evaluates this under no_grad; the inner step needs a graph.
        with tm.enable_grad():
            values = [
                v if v.requires_grad else tm.tensor(v.data, requires_grad=True) for v in values
            ]
            params = dict(zip(names, values))
            inner = F.mse_loss(nn.functional_call(model, params, xs), ys)
            grads = tm.grad(inner, values, create_graph=True)
            fast = {k: v - 0.1 * g for (k, v), g in zip(params.items(), grads)}
            return F.mse_loss(nn.functional_call(model, fast, xq), yq)

    start = [p.numpy() for p in model.parameters()]
    check_grads(meta_loss, start, order=2)
    assert_untouched(model, snap)


def test_functional_call_partial_dict_and_buffers():
    model = cnn()
    x = tm.randn(2, 1, 4, 4, rng=np.random.default_rng(4))
    model.eval()
    zero_head = {"5.weight": tm.zeros(4, 12), "5.bias": tm.ones(4)}
    out = nn.functional_call(model, zero_head, x)
    np.testing.assert_array_equal(out.numpy(), np.ones((2, 4)))  # only the head replaced
    # Buffers can be replaced too: other running statistics change the eval output.
    stats = {"1.running_mean": tm.ones(3) * 10}
    assert not np.allclose(nn.functional_call(model, stats, x).numpy(), model(x).numpy())
    # In training mode, given buffers receive the running-stat update, not the module's.
    model.train()
    mine = {"1.running_mean": tm.zeros(3), "1.running_var": tm.ones(3)}
    before = model[1].running_mean.numpy().copy()
    nn.functional_call(model, mine, x)
    np.testing.assert_array_equal(model[1].running_mean.numpy(), before)
    assert not np.array_equal(mine["1.running_mean"].numpy(), np.zeros(3))


def test_functional_call_with_per_task_batched_parameters():
    """Task-vectorized MAML passes parameters with a leading task axis; Linear layers apply
    task t's weights to task t's inputs, exactly as a loop over tasks would."""
    rng = np.random.default_rng(5)
    model = mlp(rng, dtype=tm.float64)
    tasks = 3
    batched = {
        k: tm.tensor(p.numpy() + rng.standard_normal((tasks, *p.shape)) * 0.1)
        for k, p in model.named_parameters()
    }
    x = tm.tensor(rng.standard_normal((tasks, 4, 1)))
    out = nn.functional_call(model, batched, x)
    for t in range(tasks):
        single = {k: v[t] for k, v in batched.items()}
        np.testing.assert_allclose(
            out.numpy()[t], nn.functional_call(model, single, x[t]).numpy(), rtol=1e-12
        )
    conv = cnn()
    weights = {"0.weight": tm.zeros(2, 3, 1, 3, 3)}
    # Per-task conv weights need inputs with a task axis (T, N, C, H, W): a 4-D batch is refused.
    with pytest.raises(ValueError, match=r"conv2d: per-task weights .* need an input with a task"):
        nn.functional_call(conv, weights, tm.zeros(2, 1, 4, 4))


def test_functional_call_errors_and_restores_on_error():
    model = mlp()
    with pytest.raises(KeyError, match=r"'0.wieght' is not a parameter or buffer of Sequential; "
                       r"valid names: 0.weight, 0.bias, 2.weight"):  # fmt: skip
        nn.functional_call(model, {"0.wieght": tm.zeros(8, 1)}, tm.ones(1, 1))
    with pytest.raises(ValueError, match=r"params\['0.weight'\] has shape \(2, 2\).* \(8, 1\)"):
        nn.functional_call(model, {"0.weight": tm.zeros(2, 2)}, tm.ones(1, 1))
    with pytest.raises(TypeError, match="expected a Tensor"):
        nn.functional_call(model, {"0.weight": [[0.0]] * 8}, tm.ones(1, 1))

    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(tm.ones(1))

        def forward(self, x):
            assert self.w.numpy()[0] == 5
            raise RuntimeError("boom")

    boom = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        nn.functional_call(boom, {"w": tm.full((1,), 5.0)}, None)
    assert boom.w.numpy()[0] == 1 and isinstance(boom.w, nn.Parameter)


def test_functional_call_nests_and_keeps_tied_weights_tied():
    lin = nn.Linear(2, 2, bias=False)
    model = nn.Sequential(lin, lin)  # one weight used twice
    x = tm.ones(1, 2)
    w = tm.eye(2) * 2
    out = nn.functional_call(model, {"0.weight": w}, x)
    np.testing.assert_array_equal(out.numpy(), [[4.0, 4.0]])  # both uses replaced
    with pytest.raises(ValueError, match="tied"):
        nn.functional_call(model, {"0.weight": w, "1.weight": tm.eye(2)}, x)

    def outer(inp):
        inner = nn.functional_call(lin, {"weight": tm.eye(2) * 3}, inp)  # the innermost wins
        return model[0](inner)  # back in the outer call: lin sees w again

    outer_model = nn.Sequential(lin)
    outer_model.forward = outer
    out = nn.functional_call(outer_model, {"0.weight": w}, x)
    np.testing.assert_array_equal(out.numpy(), [[6.0, 6.0]])  # 3 (inner w) then 2 (outer w)
    np.testing.assert_array_equal(lin(x).numpy(), lin.weight.numpy().sum(1, keepdims=True).T)


# --- clip_grad_norm_ ------------------------------------------------------------------------------


def _with_grads(*grads):
    params = []
    for g in grads:
        p = nn.Parameter(tm.zeros(*np.shape(g), dtype=tm.float64))
        p.grad = tm.tensor(np.array(g, dtype=np.float64))
        params.append(p)
    return params


def test_clip_grad_norm_scales_in_place():
    params = _with_grads([3.0, 0.0], [[4.0]])
    grads = [p.grad for p in params]
    versions = [g._version for g in grads]
    total = nn.utils.clip_grad_norm_(params, max_norm=1.0)
    assert isinstance(total, tm.Tensor) and total.item() == pytest.approx(5.0)
    np.testing.assert_allclose(params[0].grad.numpy(), [0.6, 0.0], rtol=1e-5)
    np.testing.assert_allclose(params[1].grad.numpy(), [[0.8]], rtol=1e-5)
    assert all(p.grad is g for p, g in zip(params, grads))  # in place
    assert all(g._version > v for g, v in zip(grads, versions))


def test_clip_grad_norm_below_threshold_and_other_norms():
    params = _with_grads([0.3, -0.4])
    assert nn.clip_grad_norm_(params, 1.0).item() == pytest.approx(0.5)
    np.testing.assert_allclose(params[0].grad.numpy(), [0.3, -0.4])
    params = _with_grads([1.0, -6.0], [2.0]) + [nn.Parameter(tm.zeros(2))]  # one without grad
    assert nn.clip_grad_norm_(params, 3.0, norm_type=float("inf")).item() == pytest.approx(6.0)
    np.testing.assert_allclose(params[0].grad.numpy(), [0.5, -3.0], rtol=1e-5)
    params = _with_grads([1.0, -2.0], [3.0])
    assert nn.clip_grad_norm_(params, 100.0, norm_type=1).item() == pytest.approx(6.0)
    assert nn.clip_grad_norm_([nn.Parameter(tm.zeros(2))], 1.0).item() == 0.0
    bad = _with_grads([np.nan])
    with pytest.raises(RuntimeError, match="clip_grad_norm_: the total 2.0-norm"):
        nn.clip_grad_norm_(bad, 1.0, error_if_nonfinite=True)


def test_leaf_grads_are_independent_writable_arrays():
    """Engine regression: x + y used to hand both leaves one read-only broadcast array,
    so an in-place update of one .grad failed (or changed the other)."""
    x = tm.tensor([1.0, 2.0], requires_grad=True)
    y = tm.tensor([3.0, 4.0], requires_grad=True)
    (x + y).sum().backward()
    assert x.grad.data is not y.grad.data
    nn.clip_grad_norm_([x, y], max_norm=1.0)
    np.testing.assert_allclose(x.grad.numpy(), [0.5, 0.5], rtol=1e-5)
    np.testing.assert_allclose(y.grad.numpy(), [0.5, 0.5], rtol=1e-5)
    a, b = tm.tensor(1.0, requires_grad=True), tm.tensor(2.0, requires_grad=True)
    (a + b).backward()
    with tm.no_grad():
        a.grad.mul_(0.5)
    assert b.grad.item() == 1.0
