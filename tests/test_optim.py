"""Tests for tinymeta.optim: update rules against NumPy transcriptions of PyTorch's
documented formulas, parameter groups, schedulers, state dicts, version counters, errors.

The problem is a float64 least-squares fit with two parameters, W (3, 2) and
b (2,): loss = mean over rows and columns of (X @ W + b - Y)**2. Its gradient
is written out in NumPy, so every reference trajectory is independent of the
engine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymeta as tm
from tinymeta import nn
from tinymeta.optim import SGD, Adam, AdamW
from tinymeta.optim.lr_scheduler import CosineAnnealingLR, StepLR

STEPS = 20
RTOL, ATOL = 1e-11, 1e-13  # float64 trajectories: only rounding-order differences

_rng = np.random.default_rng(0)
X = _rng.standard_normal((8, 3))
Y = _rng.standard_normal((8, 2))
W0 = _rng.standard_normal((3, 2))
B0 = _rng.standard_normal(2)


def loss_tm(w, b):
    r = tm.tensor(X) @ w + b - tm.tensor(Y)
    return (r * r).mean()


def grads_np(w, b):
    """d loss / d(w, b) for loss = mean((X w + b - Y)**2)."""
    r = X @ w + b - Y
    scale = 2.0 / r.size
    return scale * X.T @ r, scale * r.sum(axis=0)


def fresh_params():
    return (
        tm.tensor(W0, dtype=tm.float64, requires_grad=True),
        tm.tensor(B0, dtype=tm.float64, requires_grad=True),
    )


def run_tm(make_opt, steps=STEPS, params=None):
    """Train with tinymeta; returns the optimizer, params and the trajectory of (w, b)."""
    w, b = params if params is not None else fresh_params()
    opt = make_opt([w, b])
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        loss_tm(w, b).backward()
        opt.step()
        traj.append((w.numpy().copy(), b.numpy().copy()))
    return opt, (w, b), traj


def run_np(update, steps=STEPS):
    """Reference: ``update(i, params, grads, t)`` changes params[i] (arrays) for step t >= 1."""
    params = [W0.copy(), B0.copy()]
    traj = []
    for t in range(1, steps + 1):
        grads = grads_np(*params)
        for i in range(2):
            params[i] = update(i, params[i], grads[i], t)
        traj.append((params[0].copy(), params[1].copy()))
    return traj


def assert_same_trajectory(got, want, rtol=RTOL, atol=ATOL):
    assert len(got) == len(want)
    for t, ((gw, gb), (ww, wb)) in enumerate(zip(got, want)):
        np.testing.assert_allclose(gw, ww, rtol=rtol, atol=atol, err_msg=f"W after step {t + 1}")
        np.testing.assert_allclose(gb, wb, rtol=rtol, atol=atol, err_msg=f"b after step {t + 1}")


# --- reference update rules (PyTorch's documented algorithms, in NumPy) -----------------


def sgd_reference(lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    bufs = {}

    def update(i, theta, g, t):
        g = g + weight_decay * theta
        if momentum != 0:
            bufs[i] = g.copy() if t == 1 else momentum * bufs[i] + (1 - dampening) * g
            g = g + momentum * bufs[i] if nesterov else bufs[i]
        return theta - lr * g

    return update


def adam_reference(
    lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, decoupled=False
):
    b1, b2 = betas
    m, v, vmax = {}, {}, {}

    def update(i, theta, g, t):
        if decoupled:
            theta = theta * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * theta
        m[i] = b1 * m.get(i, 0.0) + (1 - b1) * g
        v[i] = b2 * v.get(i, 0.0) + (1 - b2) * g**2
        m_hat = m[i] / (1 - b1**t)
        if amsgrad:
            vmax[i] = np.maximum(vmax.get(i, 0.0), v[i])
            v_hat = vmax[i] / (1 - b2**t)
        else:
            v_hat = v[i] / (1 - b2**t)
        return theta - lr * m_hat / (np.sqrt(v_hat) + eps)

    return update


SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "dampening": dict(lr=0.05, momentum=0.9, dampening=0.3),
    "nesterov": dict(lr=0.05, momentum=0.8, nesterov=True),
    "weight_decay": dict(lr=0.1, weight_decay=0.05),
    "all": dict(lr=0.03, momentum=0.7, nesterov=True, weight_decay=0.01),
}

ADAM_CASES = {
    "adam": (Adam, dict(lr=0.05), False),
    "adam_betas": (Adam, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6), False),
    "adam_weight_decay": (Adam, dict(lr=0.05, weight_decay=0.1), False),
    "adam_amsgrad": (Adam, dict(lr=0.05, amsgrad=True), False),
    "adam_amsgrad_wd": (Adam, dict(lr=0.05, amsgrad=True, weight_decay=0.1), False),
    "adamw": (AdamW, dict(lr=0.05), True),
    "adamw_strong_decay": (AdamW, dict(lr=0.05, weight_decay=0.5), True),
    "adamw_amsgrad": (AdamW, dict(lr=0.05, weight_decay=0.1, amsgrad=True), True),
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_trajectory_matches_formula(case):
    kwargs = SGD_CASES[case]
    _, _, got = run_tm(lambda ps: SGD(ps, **kwargs))
    assert_same_trajectory(got, run_np(sgd_reference(**kwargs)))


@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_trajectory_matches_formula(case):
    cls, kwargs, decoupled = ADAM_CASES[case]
    _, _, got = run_tm(lambda ps: cls(ps, **kwargs))
    ref_kwargs = dict(kwargs)
    if cls is AdamW:
        ref_kwargs.setdefault("weight_decay", 1e-2)
    assert_same_trajectory(got, run_np(adam_reference(decoupled=decoupled, **ref_kwargs)))


def test_adamw_default_weight_decay_differs_from_adam():
    _, _, adam = run_tm(lambda ps: Adam(ps, lr=0.05), steps=3)
    _, _, adamw = run_tm(lambda ps: AdamW(ps, lr=0.05), steps=3)
    assert AdamW([tm.zeros(1, requires_grad=True)]).defaults["weight_decay"] == 1e-2
    assert not np.allclose(adam[-1][0], adamw[-1][0], rtol=0, atol=1e-9)


def test_loss_decreases():
    for make in (lambda ps: SGD(ps, lr=0.1, momentum=0.9), lambda ps: Adam(ps, lr=0.05)):
        _, (w, b), _ = run_tm(make, steps=50)
        start = loss_tm(*fresh_params()).item()
        assert loss_tm(w, b).item() < 0.5 * start


def test_float32_params_keep_their_dtype():
    w = tm.randn(4, 3, requires_grad=True)
    opt = Adam([w], lr=0.1, amsgrad=True)
    for _ in range(3):
        opt.zero_grad()
        (w * w).sum().backward()
        opt.step()
    assert w.dtype == tm.float32
    assert all(a.dtype == np.float32 for k, a in opt.state[w].items() if k != "step")


# --- Adam's one-call update: the NumPy arithmetic it replaced, bit for bit ------------------


def adam_steps_in_numpy(param, grads, lr, betas, eps, weight_decay, amsgrad, decoupled):
    """``param`` after one Adam step per gradient, spelt one NumPy operation at a time as
    ``Adam._update`` computed it before the update became ``kernels.adam_update_`` (Python
    floats rounded by NumPy to the arrays' dtype); returns param and the moments."""
    b1, b2 = betas
    param = param.copy()
    exp_avg, exp_avg_sq, max_exp_avg_sq = (np.zeros_like(param) for _ in range(3))
    for step, grad in enumerate(grads, start=1):
        if weight_decay != 0:
            if decoupled:
                param *= 1 - lr * weight_decay
            else:
                grad = grad + weight_decay * param
        exp_avg *= b1
        exp_avg += (1 - b1) * grad
        exp_avg_sq *= b2
        exp_avg_sq += (1 - b2) * grad * grad
        bias_correction1 = 1 - b1**step
        bias_correction2_sqrt = math.sqrt(1 - b2**step)
        if amsgrad:
            np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = np.sqrt(max_exp_avg_sq) / bias_correction2_sqrt + eps
        else:
            denom = np.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
        param += (-lr / bias_correction1) * (exp_avg / denom)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


@given(
    shapes=st.lists(st.lists(st.integers(1, 6), max_size=3).map(tuple), min_size=1, max_size=3),
    dtype=st.sampled_from([np.float32, np.float64]),
    decoupled=st.booleans(),
    amsgrad=st.booleans(),
    lr=st.floats(1e-4, 1.0),
    betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
    eps=st.floats(1e-10, 1e-2),
    weight_decay=st.sampled_from([0.0, 1e-2, 0.3]),
    steps=st.integers(1, 4),
    backend=st.sampled_from(["numba", "numpy"]),
    seed=st.integers(0, 2**16),
)
def test_adam_step_is_the_numpy_arithmetic_bit_for_bit(
    shapes, dtype, decoupled, amsgrad, lr, betas, eps, weight_decay, steps, backend, seed
):
    """Adam and AdamW, with and without weight decay and amsgrad, float32 and float64, under
    both kernel backends: parameters and state equal the step-by-step NumPy arithmetic."""
    from tinymeta import kernels

    rng = np.random.default_rng(seed)
    starts = [rng.standard_normal(shape).astype(dtype) for shape in shapes]
    grads = [[rng.standard_normal(shape).astype(dtype) for shape in shapes] for _ in range(steps)]
    params = [tm.tensor(start.copy(), requires_grad=True) for start in starts]
    cls = AdamW if decoupled else Adam
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
    previous = kernels.set_backend(backend)
    try:
        opt = cls(params, **hyper)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = tm.tensor(g.copy())
            opt.step()
    finally:
        kernels.set_backend(previous)

    for i, (p, start) in enumerate(zip(params, starts)):
        mine = [g[i] for g in grads]
        want, exp_avg, exp_avg_sq, max_exp_avg_sq = adam_steps_in_numpy(
            start, mine, decoupled=decoupled, **hyper
        )
        state = opt.state[p]
        assert p.dtype == dtype and state["step"] == steps
        np.testing.assert_array_equal(p.numpy(), want)
        np.testing.assert_array_equal(state["exp_avg"], exp_avg)
        np.testing.assert_array_equal(state["exp_avg_sq"], exp_avg_sq)
        if amsgrad:
            np.testing.assert_array_equal(state["max_exp_avg_sq"], max_exp_avg_sq)
        np.testing.assert_array_equal(p.grad.numpy(), mine[-1])  # the gradient left alone


# --- parameter groups ---------------------------------------------------------------------


def test_param_groups_with_their_own_lr_and_defaults():
    w, b = fresh_params()
    opt = SGD([{"params": [w]}, {"params": [b], "lr": 0.01, "momentum": 0.5}], lr=0.1, momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.5]
    assert opt.param_groups[1]["nesterov"] is False  # filled from the constructor

    _, _, got = run_tm(lambda ps: opt, params=(w, b))
    ref_w = sgd_reference(lr=0.1, momentum=0.9)
    ref_b = sgd_reference(lr=0.01, momentum=0.5)
    want = run_np(lambda i, theta, g, t: (ref_w if i == 0 else ref_b)(i, theta, g, t))
    assert_same_trajectory(got, want)


def test_add_param_group():
    w, b = fresh_params()
    opt = SGD([w], lr=0.1)
    opt.add_param_group({"params": b, "lr": 0.5})
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["params"][0] is b and opt.param_groups[1]["lr"] == 0.5
    assert opt.param_groups[1]["momentum"] == 0.0
    with pytest.raises(ValueError, match="already in parameter group 0"):
        opt.add_param_group({"params": [w]})


def test_params_with_no_grad_are_skipped():
    w, b = fresh_params()
    opt = Adam([w, b], lr=0.1)
    (w * w).sum().backward()  # b gets no gradient
    opt.step()
    np.testing.assert_array_equal(b.numpy(), B0)
    assert b._version == 0 and b not in opt.state
    assert w._version > 0 and opt.state[w]["step"] == 1


def test_generator_of_params_is_accepted():
    w, b = fresh_params()
    opt = SGD((p for p in (w, b)), lr=0.1)
    kept = opt.param_groups[0]["params"]
    assert len(kept) == 2 and kept[0] is w and kept[1] is b


def test_closure_is_evaluated_and_returned():
    w, b = fresh_params()
    opt = SGD([w, b], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = loss_tm(w, b)
        loss.backward()
        return loss

    with tm.no_grad():  # the closure still records (step turns grad mode on for it)
        loss = opt.step(closure)
    assert loss.item() == pytest.approx(loss_tm(*fresh_params()).item())
    assert not np.array_equal(w.numpy(), W0)


# --- zero_grad, graphs, version counters ----------------------------------------------------


def test_zero_grad_sets_none_or_zeros():
    w, b = fresh_params()
    opt = SGD([w, b], lr=0.1)
    loss_tm(w, b).backward()
    opt.zero_grad(set_to_none=False)
    assert w.grad is not None and not w.grad.numpy().any() and w.grad.shape == w.shape
    opt.zero_grad()
    assert w.grad is None and b.grad is None


def test_step_records_no_graph_and_keeps_leaves():
    w, b = fresh_params()
    opt = Adam([w, b], lr=0.1)
    loss_tm(w, b).backward()
    opt.step()  # grad mode is on here: step must switch it off itself
    assert w.is_leaf and w.grad_fn is None and w.requires_grad


def test_step_bumps_version_and_stale_graph_refuses_backward():
    w, b = fresh_params()
    opt = SGD([w, b], lr=0.1, momentum=0.9)
    saved = (w * w).sum()  # Mul saves w for its backward
    loss_tm(w, b).backward()
    before = w._version
    opt.step()
    assert w._version > before
    with pytest.raises(RuntimeError, match="modified in place"):
        tm.grad(saved, w)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_on_big_float32_params_is_numpys_update_bit_for_bit(backend, momentum):
    """Parameters big enough for the compiled update (tinymeta.kernels.sgd_update_), float32,
    against NumPy's ``p -= lr * g`` with the same rounding, under both kernel backends."""
    from tinymeta import kernels

    rng = np.random.default_rng(1)
    w = tm.tensor(rng.standard_normal((64, 100)).astype(np.float32), requires_grad=True)
    target = rng.standard_normal((64, 100)).astype(np.float32)
    expected, buf = w.numpy().copy(), None
    previous = kernels.set_backend(backend)
    try:
        opt = SGD([w], lr=0.01, momentum=momentum)
        for _ in range(3):
            opt.zero_grad()
            ((w - tm.tensor(target)) ** 2).sum().backward()
            g = w.grad.numpy()
            np.testing.assert_array_equal(g, 2 * (expected - target))  # same start each step
            if momentum:
                buf = g.copy() if buf is None else buf * np.float32(momentum) + g
                g = buf
            version = w._version
            opt.step()
            expected -= 0.01 * g
            assert w._version > version
            assert w.dtype == np.float32
            np.testing.assert_array_equal(w.numpy(), expected)
    finally:
        kernels.set_backend(previous)


def test_step_does_not_modify_grad_arrays():
    w, b = fresh_params()
    opt = SGD([w, b], lr=0.1, momentum=0.9, weight_decay=0.1)
    loss_tm(w, b).backward()
    g = w.grad.numpy().copy()
    opt.step()
    opt.step()
    np.testing.assert_array_equal(w.grad.numpy(), g)


# --- state dicts: bit-identical resume ---------------------------------------------------

RESUME_CASES = {
    "sgd_nesterov": lambda ps, **kw: SGD(
        ps, **{"lr": 0.05, "momentum": 0.9, "nesterov": True, **kw}
    ),
    "sgd_dampening": lambda ps, **kw: SGD(
        ps, **{"lr": 0.05, "momentum": 0.9, "dampening": 0.2, **kw}
    ),
    "adam_amsgrad": lambda ps, **kw: Adam(ps, **{"lr": 0.05, "amsgrad": True, **kw}),
    "adamw": lambda ps, **kw: AdamW(ps, **{"lr": 0.05, "weight_decay": 0.1, **kw}),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_state_dict_resume_is_bit_identical(case):
    make = RESUME_CASES[case]
    w, b = fresh_params()
    opt = make([w, b])
    full, saved, saved_params = [], None, None
    for t in range(STEPS):
        if t == STEPS // 2:
            saved = opt.state_dict()
            saved_params = (w.numpy().copy(), b.numpy().copy())
        opt.zero_grad()
        loss_tm(w, b).backward()
        opt.step()
        full.append((w.numpy().copy(), b.numpy().copy()))

    # A fresh model and optimizer (with other hyper-parameters: the loaded ones win).
    w2 = tm.tensor(saved_params[0], requires_grad=True)
    b2 = tm.tensor(saved_params[1], requires_grad=True)
    opt2 = make([w2, b2], lr=123.0)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 0.05
    for t in range(STEPS // 2, STEPS):
        opt2.zero_grad()
        loss_tm(w2, b2).backward()
        opt2.step()
        np.testing.assert_array_equal(w2.numpy(), full[t][0], err_msg=f"W at step {t + 1}")
        np.testing.assert_array_equal(b2.numpy(), full[t][1], err_msg=f"b at step {t + 1}")


def test_state_dict_layout_is_pytorchs():
    w, b = fresh_params()
    opt = SGD([{"params": [w]}, {"params": [b], "lr": 0.01}], lr=0.1, momentum=0.9)
    loss_tm(w, b).backward()
    opt.step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert sd["param_groups"][0]["params"] == [0] and sd["param_groups"][1]["params"] == [1]
    assert sd["param_groups"][1]["lr"] == 0.01 and sd["param_groups"][0]["momentum"] == 0.9
    assert set(sd["state"]) == {0, 1} and set(sd["state"][0]) == {"momentum_buffer"}
    assert sd["state"][0]["momentum_buffer"].shape == w.shape
    # A snapshot: later steps leave it alone.
    buf = sd["state"][0]["momentum_buffer"].copy()
    opt.step()
    np.testing.assert_array_equal(sd["state"][0]["momentum_buffer"], buf)


def test_load_state_dict_casts_and_checks():
    w = tm.randn(3, requires_grad=True)  # float32
    opt = Adam([w], lr=0.1)
    (w * w).sum().backward()
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].astype(np.float64)
    sd["state"][0]["step"] = np.asarray(1)  # as it comes back from a file
    opt2 = Adam([tm.randn(3, requires_grad=True)])
    opt2.load_state_dict(sd)
    (state,) = opt2.state.values()
    assert state["exp_avg"].dtype == np.float32 and state["step"] == 1

    with pytest.raises(ValueError, match="2 parameter groups"):
        opt2.load_state_dict({"state": {}, "param_groups": sd["param_groups"] * 2})
    bad = opt.state_dict()
    bad["param_groups"][0]["params"] = [0, 1]
    with pytest.raises(ValueError, match="has 1 parameters, the saved group has 2"):
        opt2.load_state_dict(bad)
    bad = opt.state_dict()
    bad["state"][0]["exp_avg"] = np.zeros(4)
    with pytest.raises(ValueError, match="shape"):
        opt2.load_state_dict(bad)


# --- schedulers ------------------------------------------------------------------------------


def _one_param_opt(lr=0.1, **kw):
    return SGD([tm.zeros(2, requires_grad=True)], lr=lr, **kw)


def test_step_lr_sequence():
    opt = SGD(
        [
            {"params": [tm.zeros(2, requires_grad=True)]},
            {"params": [tm.zeros(1, requires_grad=True)], "lr": 1.0},
        ],
        lr=0.1,
    )
    sched = StepLR(opt, step_size=3, gamma=0.5)
    seen = []
    for _ in range(10):
        seen.append(sched.get_last_lr())
        assert [g["lr"] for g in opt.param_groups] == seen[-1]
        opt.step()
        sched.step()
    want = [[base * 0.5 ** (e // 3) for base in (0.1, 1.0)] for e in range(10)]
    np.testing.assert_allclose(seen, want, rtol=1e-15)


def test_cosine_annealing_sequence():
    opt = _one_param_opt(lr=0.2)
    sched = CosineAnnealingLR(opt, T_max=8, eta_min=0.01)
    seen = []
    for _ in range(17):
        seen.append(sched.get_last_lr()[0])
        sched.step()
    want = [0.01 + (0.2 - 0.01) * (1 + math.cos(math.pi * e / 8)) / 2 for e in range(17)]
    np.testing.assert_allclose(seen, want, rtol=1e-14)
    assert seen[0] == pytest.approx(0.2) and seen[8] == pytest.approx(0.01)


def test_scheduler_state_dict_resume():
    opt = _one_param_opt(lr=0.2)
    sched = CosineAnnealingLR(opt, T_max=10)
    for _ in range(4):
        sched.step()
    opt_sd, sched_sd = opt.state_dict(), sched.state_dict()
    rest = []
    for _ in range(5):
        sched.step()
        rest.append(sched.get_last_lr())

    opt2 = _one_param_opt(lr=0.2)
    opt2.load_state_dict(opt_sd)
    sched2 = CosineAnnealingLR(opt2, T_max=3)  # the loaded state replaces these settings
    sched2.load_state_dict(sched_sd)
    assert sched2.T_max == 10 and sched2.last_epoch == 4
    rest2 = []
    for _ in range(5):
        sched2.step()
        rest2.append(sched2.get_last_lr())
    assert rest2 == rest
    assert opt2.param_groups[0]["lr"] == rest[-1][0]


def test_scheduler_records_initial_lr():
    opt = _one_param_opt(lr=0.3)
    StepLR(opt, step_size=2)
    assert opt.param_groups[0]["initial_lr"] == 0.3
    with pytest.raises(KeyError, match="initial_lr"):
        StepLR(_one_param_opt(), step_size=2, last_epoch=5)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda o: StepLR(o, step_size=0), "step_size must be a positive integer"),
        (lambda o: StepLR(o, step_size=2, gamma=-1.0), "gamma must be a positive"),
        (lambda o: CosineAnnealingLR(o, T_max=0), "T_max must be a positive integer"),
        (lambda o: CosineAnnealingLR(o, T_max=5, eta_min=-1.0), "eta_min must be >= 0"),
    ],
)
def test_scheduler_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make(_one_param_opt())
    with pytest.raises(TypeError, match="expected an Optimizer"):
        StepLR([1, 2], step_size=1)


# --- errors ------------------------------------------------------------------------------------


def _w():
    return tm.randn(3, requires_grad=True)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: SGD([_w()], lr=-0.1), ValueError, r"invalid learning rate lr=-0.1"),
        (lambda: Adam([_w()], lr=-1e-3), ValueError, r"invalid learning rate"),
        (lambda: SGD([_w()], lr=float("nan")), ValueError, r"invalid learning rate"),
        (lambda: SGD([_w()], lr="0.1"), TypeError, r"lr must be a real number"),
        (lambda: SGD([_w()], lr=0.1, momentum=-0.5), ValueError, r"invalid momentum"),
        (lambda: SGD([_w()], lr=0.1, weight_decay=-1), ValueError, r"invalid weight decay"),
        (
            lambda: SGD([_w()], lr=0.1, nesterov=True),
            ValueError,
            r"Nesterov momentum needs momentum > 0",
        ),
        (
            lambda: SGD([_w()], lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
            ValueError,
            r"Nesterov momentum needs momentum > 0 and dampening = 0",
        ),
        (lambda: Adam([_w()], betas=(1.0, 0.999)), ValueError, r"invalid beta betas\[0\]=1.0"),
        (lambda: Adam([_w()], betas=(0.9, -0.1)), ValueError, r"invalid beta betas\[1\]"),
        (lambda: Adam([_w()], betas=(0.9,)), ValueError, r"betas must be a pair"),
        (lambda: Adam([_w()], eps=-1e-8), ValueError, r"invalid epsilon"),
        (lambda: AdamW([_w()], weight_decay=-0.1), ValueError, r"invalid weight decay"),
        (lambda: SGD([{"params": [_w()], "lr": -1.0}], lr=0.1), ValueError, r"group 0's"),
        (lambda: SGD(_w(), lr=0.1), TypeError, r"got a single Tensor"),
        (lambda: SGD([], lr=0.1), ValueError, r"empty parameter list"),
        (lambda: SGD({_w()}, lr=0.1), TypeError, r"not a set"),
        (
            lambda: SGD([np.zeros(3)], lr=0.1),
            TypeError,
            r"is a ndarray; an optimizer updates Tensors",
        ),
        (lambda: SGD([tm.zeros(3)], lr=0.1), ValueError, r"does not require grad"),
        (lambda: SGD([tm.arange(3)], lr=0.1), TypeError, r"dtype int64.*only floating-point"),
        (lambda: SGD([_w() * 2], lr=0.1), ValueError, r"not a leaf"),
        (lambda: SGD([{"lr": 0.1}], lr=0.1), ValueError, r"needs a 'params' entry"),
        (lambda: SGD([{"params": []}], lr=0.1), ValueError, r"group 0 is empty"),
    ],
)
def test_invalid_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_duplicate_params_rejected():
    w = _w()
    with pytest.raises(ValueError, match="appears more than once"):
        SGD([w, w], lr=0.1)
    with pytest.raises(ValueError, match="already in parameter group 0"):
        SGD([{"params": [w]}, {"params": [w]}], lr=0.1)


# --- optional: PyTorch itself ------------------------------------------------------------


TORCH_CASES = {
    "sgd_nesterov_wd": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd_dampening": ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    "adam_amsgrad_wd": ("Adam", dict(lr=0.05, amsgrad=True, weight_decay=0.1)),
    "adamw": ("AdamW", dict(lr=0.05, weight_decay=0.1)),
}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_matches_torch_optim(case):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (optional comparison)")
    name, kwargs = TORCH_CASES[case]
    _, _, got = run_tm(lambda ps: getattr(tm.optim, name)(ps, **kwargs))

    w = torch.tensor(W0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(B0, dtype=torch.float64, requires_grad=True)
    xt, yt = torch.tensor(X), torch.tensor(Y)
    opt = getattr(torch.optim, name)([w, b], **kwargs)
    want = []
    for _ in range(STEPS):
        opt.zero_grad()
        ((xt @ w + b - yt) ** 2).mean().backward()
        opt.step()
        want.append((w.detach().numpy().copy(), b.detach().numpy().copy()))
    assert_same_trajectory(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not tm.cuda.is_available(), reason="needs CuPy and a CUDA GPU")
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_cuda_matches_cpu(name):
    def make(ps):
        if name == "sgd":
            return SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
        return Adam(ps, lr=0.05, amsgrad=True, weight_decay=0.1)

    _, _, cpu = run_tm(make, steps=5)
    w, b = (p.to("cuda").detach().requires_grad_() for p in fresh_params())
    x, y = tm.tensor(X, device="cuda"), tm.tensor(Y, device="cuda")
    opt = make([w, b])
    for t in range(5):
        opt.zero_grad()
        r = x @ w + b - y
        (r * r).mean().backward()
        opt.step()
        np.testing.assert_allclose(w.numpy(), cpu[t][0], rtol=1e-9, atol=1e-12)
    assert w.device == "cuda" and all(
        a.device == w.data.device for k, a in opt.state[w].items() if k != "step"
    )
    sd = opt.state_dict()
    opt2 = make(
        [tm.tensor(w.numpy(), requires_grad=True), tm.tensor(b.numpy(), requires_grad=True)]
    )
    opt2.load_state_dict(sd)  # cuda state into cpu parameters: moved to their device
    assert all(
        isinstance(a, np.ndarray) for s in opt2.state.values() for k, a in s.items() if k != "step"
    )


@pytest.mark.parametrize(
    "make", [lambda p: SGD([p], lr=0.1), lambda p: SGD([p], lr=0.1, momentum=0.9),
             lambda p: Adam([p], lr=0.1), lambda p: AdamW([p], lr=0.1)],
    ids=["SGD", "SGD momentum", "Adam", "AdamW"],
)  # fmt: skip
def test_step_refuses_memory_a_graph_computed_and_the_hinted_copy_trains(make):
    """A detached alias of a computed tensor shares its memory: a step would change the
    computed values behind their graph's back. Every optimizer refuses it (and leaves the
    values alone); the copy that the not-a-leaf error suggests trains."""
    x = tm.tensor(np.ones(3), requires_grad=True)
    y = x * 2.0
    with pytest.raises(ValueError, match=r"\(x.detach\(\) \* 1.0\).requires_grad_\(\)"):
        make(y)
    alias = y.detach().requires_grad_()
    optimizer = make(alias)
    (alias * alias).sum().backward()
    with pytest.raises(RuntimeError, match=r"step: in-place change of an alias"):
        optimizer.step()
    np.testing.assert_array_equal(y.numpy(), [2.0, 2.0, 2.0])
    copy = (y.detach() * 1.0).requires_grad_()
    optimizer = make(copy)
    (copy * copy).sum().backward()
    optimizer.step()
    assert (copy.numpy() < 2.0).all()
    np.testing.assert_array_equal(y.numpy(), [2.0, 2.0, 2.0])


@pytest.mark.parametrize("owner", ["optimizer", "module"])
def test_zero_grad_to_zeros_writes_in_place_as_pytorch(owner):
    """zero_grad(set_to_none=False) fills .grad's own memory (PyTorch's zero_()): a reference
    taken before sees the zeros and the next backward's sum; a graph that saved the old .grad
    refuses its backward. A .grad with a graph gets zeros of its own, and keeps its values."""
    lin = nn.Linear(3, 2)
    w = lin.weight
    opt = SGD([w], lr=0.1)

    def zero():
        (opt if owner == "optimizer" else lin).zero_grad(set_to_none=False)

    x = tm.tensor(np.ones((4, 3)))
    lin(x).sum().backward()
    held = w.grad
    saved = (held * tm.tensor(np.ones((2, 3)), requires_grad=True)).sum()  # Mul saved .grad
    zero()
    assert w.grad is held and not held.numpy().any()
    with pytest.raises(RuntimeError, match="modified in place"):
        saved.backward()
    lin(x).sum().backward()
    assert w.grad is held
    np.testing.assert_array_equal(held.numpy(), np.full((2, 3), 4.0))
    # a .grad made by backward(create_graph=True): fresh zeros, the old tensor untouched
    w.grad = None
    (lin(x) ** 2).sum().backward(create_graph=True)
    computed = w.grad
    before = computed.numpy().copy()
    zero()
    assert w.grad is not computed and not w.grad.numpy().any() and w.grad.grad_fn is None
    np.testing.assert_array_equal(computed.numpy(), before)
