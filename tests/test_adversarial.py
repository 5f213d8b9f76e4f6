"""Adversarial cases: each one returned a silently wrong gradient (or a silently stale
replay) before it was fixed; now it gives the right number or refuses with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

import tinymeta as tm
from tinymeta import nn
from tinymeta.capture import CaptureError
from tinymeta.nn.utils import clip_grad_norm_

# --- in-place changes, under no_grad, of memory that a graph computed --------------------------
# The changed tensor keeps its creator, so a gradient through it would be that of the values
# before the change (d sum(y) / dw = 2 where y = 20 w).


def _computed():
    w = tm.tensor(np.array([3.0, 4.0]), requires_grad=True)
    return w, w * 2.0


@pytest.mark.parametrize(
    "change",
    [
        lambda y: y.mul_(10.0),
        lambda y: y.add_(1.0),
        lambda y: y.copy_(np.zeros(2)),
        lambda y: y.fill_(0.0),
        lambda y: y.__setitem__(0, 100.0),
    ],
    ids=["mul_", "add_", "copy_", "fill_", "setitem"],
)
def test_in_place_change_of_a_computed_tensor_under_no_grad_is_refused(change):
    w, y = _computed()
    with tm.no_grad(), pytest.raises(RuntimeError, match="computed by .* no graph records"):
        change(y)


@pytest.mark.parametrize(
    "alias",
    [
        lambda y: y.detach(),
        lambda y: tm.Tensor(y),
        lambda y: y.detach()[1:],
    ],
    ids=["detach", "Tensor(t)", "view of detach"],
)
def test_in_place_change_through_an_alias_of_a_computed_tensor_is_refused(alias):
    w, y = _computed()
    a = alias(y)
    with pytest.raises(RuntimeError, match="alias .* no graph records"):
        a[0] = 50.0
    with tm.no_grad(), pytest.raises(RuntimeError, match="no graph records"):
        a.mul_(3.0)
    (g,) = tm.grad(y.sum(), w)
    assert np.array_equal(g.data, [2.0, 2.0])  # nothing was changed


def test_view_made_under_no_grad_of_a_computed_tensor_is_refused():
    w, y = _computed()
    with tm.no_grad():
        v = y[1:]
        with pytest.raises(RuntimeError, match="no graph records"):
            v.mul_(3.0)


def test_leaves_and_their_views_stay_changeable_under_no_grad():
    """Optimizers, initialisation and buffers change leaves in place: still allowed."""
    w = tm.tensor(np.array([3.0, 4.0]), requires_grad=True)
    with tm.no_grad():
        w.mul_(2.0)
        w.detach()[0] = 1.0
        w[1:].add_(1.0)
    assert np.array_equal(w.data, [1.0, 9.0])
    y = (w * 2.0).detach() * 1.0  # a copy of a computed tensor: its own memory
    y.mul_(3.0)
    assert np.array_equal(y.data, [6.0, 54.0])


def test_clip_grad_norm_of_a_differentiable_gradient_is_refused():
    """clip_grad_norm_ scales .grad in place under no_grad: after
    backward(create_graph=True) a second-order gradient through .grad ignored the scaling
    (d/dw sum(g^2) came out as 2 * g_clipped * 2 instead of 8 c^2 w)."""
    w = tm.tensor(np.array([3.0, 4.0]), requires_grad=True)
    (w**2).sum().backward(create_graph=True)
    with pytest.raises(RuntimeError, match=r"clip_grad_norm_: .*create_graph=True"):
        clip_grad_norm_([w], 1.0)
    assert np.array_equal(w.grad.data, [6.0, 8.0])
    w.grad = None
    (w**2).sum().backward()  # a gradient without a graph is clipped as before
    clip_grad_norm_([w], 1.0)
    np.testing.assert_allclose(w.grad.data, [0.6, 0.8], rtol=1e-5)


# --- tm.capture: Python values that the step reads besides its inputs --------------------------
# Each replayed the capturing call's value without a word (a stale learning rate, training
# mode, counter, momentum); now a change re-captures (or raises with on_change="raise").

X = np.random.default_rng(0).standard_normal((4, 3))
STEP_SIZE = 0.1  # a global the step reads (and changes)


def _eager_and_captured(make, calls=4):
    """The step run eagerly and captured from equal states: results and states after each
    call, which must be bit-identical."""
    runs = []
    for captured in (False, True):
        step, state = make()
        run = tm.capture(step) if captured else step
        runs.append([(run(X).data.copy(), [a.copy() for a in state()]) for _ in range(calls)])
    for i, ((re, se), (rc, sc)) in enumerate(zip(*runs)):
        assert np.array_equal(re, rc), f"call {i}: results differ"
        for a, b in zip(se, sc):
            assert np.array_equal(a, b), f"call {i}: states differ"
    return run


def _global_step_size():
    global STEP_SIZE
    STEP_SIZE = 0.1
    w = tm.tensor(np.ones((3, 1)), requires_grad=True)

    def step(x):
        global STEP_SIZE
        w.grad = None
        loss = (x @ w).sum()
        loss.backward()
        with tm.no_grad():
            w.sub_(w.grad * STEP_SIZE)
        STEP_SIZE = STEP_SIZE * 2
        return loss

    return step, lambda: [w.data]


def _closure_counter():
    w = tm.tensor(np.ones((3, 1)), requires_grad=True)
    calls = [0]

    def step(x):
        calls[0] += 1
        return (x @ w).sum() * (2.0 if calls[0] > 1 else 1.0)

    return step, lambda: [w.data]


def _train_eval_switch():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(3, 4, rng=rng), nn.BatchNorm1d(4))

    def step(x):
        out = model(x).sum()
        model.train(not model.training)
        return out

    return step, lambda: [t.data for t in [*model.parameters(), *model.buffers()]]


def _momentum_change():
    bn = nn.BatchNorm1d(3)

    def step(x):
        out = bn(x).sum()
        bn.momentum = bn.momentum / 2
        return out

    return step, lambda: [t.data for t in bn.buffers()]


def _rule_lr_change():
    w = tm.tensor(np.ones((3, 1)), requires_grad=True)
    rule = tm.meta.InnerSGD(0.1)

    def step(x):
        (g,) = tm.grad((x @ w).sum(), w)
        new = rule({"w": w}, {"w": g}, 0, {})["w"]
        rule.lr = rule.lr * 2
        return new.sum()

    return step, lambda: [w.data]


@pytest.mark.parametrize(
    "make",
    [_global_step_size, _closure_counter, _train_eval_switch, _momentum_change, _rule_lr_change],
    ids=["global", "closure counter", "train/eval", "BN momentum", "rule lr"],
)
def test_capture_sees_python_values_the_step_reads(make):
    _eager_and_captured(make)


def test_capture_python_value_change_raises_when_asked():
    step, _ = _closure_counter()
    run = tm.capture(step, on_change="raise")
    run(X)
    with pytest.raises(CaptureError, match="a Python value it reads changed"):
        run(X)


def test_capture_replays_while_python_values_stay():
    model = nn.Sequential(nn.Linear(3, 2, rng=np.random.default_rng(0)))
    scale = 2.0

    def step(x):
        return model(x).sum() * scale

    run = _eager_and_captured(lambda: (step, lambda: []), calls=3)
    assert run.captures == 1


def test_capture_refuses_numpy_global_random():
    w = tm.tensor(np.ones((3, 1)), requires_grad=True)

    def step(x):
        return ((x @ w) * tm.tensor(np.random.standard_normal((4, 1)))).sum()

    with pytest.raises(CaptureError, match=r"numpy.random.standard_normal\(\) draws random"):
        tm.capture(step)(X)
    assert np.random.standard_normal.__module__ != "tinymeta.capture"  # given back


def test_capture_sees_a_parameter_group_added_to_an_optimizer():
    """A replay sets the .grad of the parameters the captured step updated; a parameter
    added since was stepped with its .grad of the call before (0.96 instead of 0.9604)."""
    from tinymeta.optim import SGD

    def make():
        w = tm.tensor(np.ones((3, 1)), requires_grad=True)
        extra = tm.tensor(np.ones(1), requires_grad=True)
        opt = SGD([w], lr=0.01)

        def step(x):
            opt.zero_grad()
            loss = ((x @ w) ** 2).mean() + (extra * extra).sum()
            loss.backward()
            opt.step()
            return loss

        return step, opt, [w, extra]

    runs = []
    for captured in (False, True):
        step, opt, params = make()
        run = tm.capture(step) if captured else step
        for i in range(4):
            if i == 2:
                opt.add_param_group({"params": [params[1]]})
            run(X)
        runs.append([p.data.copy() for p in params])
    for a, b in zip(*runs):
        assert np.array_equal(a, b)
    assert run.captures == 2


def test_capture_sees_first_order_inner_grads_and_grad_mode():
    """Captured with second-order inner gradients, a call inside first_order_inner_grads()
    replayed the second-order program."""
    from tinymeta.autograd.first_order import first_order_inner_grads

    grads = []
    for captured in (False, True):
        w = tm.tensor(np.ones((3, 1)), requires_grad=True)

        def step(x, w=w):
            w.grad = None
            (g,) = tm.grad(((x @ w) ** 2).sum(), w, create_graph=True)
            loss = ((x @ (w - 0.1 * g)) ** 2).sum()
            loss.backward()
            return loss

        run = tm.capture(step) if captured else step
        run(X)
        with first_order_inner_grads():
            run(X)
        grads.append(w.grad.data.copy())
    assert np.array_equal(grads[0], grads[1])
    assert run.captures == 2


def test_a_parameter_viewed_and_detached_stays_changeable():
    """The refusal above is for memory a graph computed: a leaf's memory, even through a
    view with a grad_fn and its detach(), stays changeable (optimizers, logging)."""
    from tinymeta.optim import Adam

    p = tm.tensor(np.ones(3), requires_grad=True)
    d = p[0:2].detach()  # the view has a grad_fn (GetItem); its memory is p's
    opt = Adam([p], lr=0.1)
    p.grad = tm.tensor(np.ones(3))
    opt.step()
    with tm.no_grad():
        d.mul_(2.0)
        p.add_(1.0)
    np.testing.assert_allclose(p.data, [2.8, 2.8, 1.9])


def test_capture_sees_a_parameter_replaced_by_a_new_tensor():
    """A module attribute or a dict entry given a new tensor between calls: the replay read
    the old tensor's array (the same result three times)."""
    results = []
    for captured in (False, True):
        m = nn.Linear(3, 1, rng=np.random.default_rng(0))
        params = {"w": tm.tensor(np.ones((3, 1)), requires_grad=True)}

        def step(x, m=m, params=params):
            return m(x).sum() + (x @ params["w"]).sum()

        run = tm.capture(step) if captured else step
        out = [run(X).data.copy()]
        m.weight = nn.Parameter(np.full((1, 3), 5.0, dtype=np.float32))
        out.append(run(X).data.copy())
        params["w"] = tm.tensor(np.full((3, 1), 7.0), requires_grad=True)
        out.append(run(X).data.copy())
        results.append(out)
    for a, b in zip(*results):
        assert np.array_equal(a, b)
    assert run.captures == 3


# --- found by random programs (tests/test_random_programs.py) ---------------------------------


def test_capture_of_a_tensor_power_replays_zero_bases_exactly():
    """Pow's backward chose its formula with a Python branch on the values (is any base 0?):
    capturing a step with ``a ** b`` of two tensors raised CaptureError. It now takes the
    masked formula while capturing, so a replay that meets a = 0 gives eager's gradients."""
    results = []
    for captured in (False, True):
        a = tm.tensor(np.array([0.5, 2.0, 1.0]), requires_grad=True)
        b = tm.tensor(np.array([1.5, 3.0, 2.0]), requires_grad=True)

        def step(x, a=a, b=b):
            a.grad = b.grad = None
            ((a + x) ** b).sum().backward()
            return a.grad, b.grad

        run = tm.capture(step) if captured else step
        shifts = ([0.0, 0.0, 0.0], [0.5, 0.0, 1.0], [-0.5, -2.0, -1.0])  # the last: every base 0
        results.append([[g.numpy().copy() for g in run(tm.tensor(np.array(s)))] for s in shifts])
    assert run.captures == 1
    for eager, replayed in zip(*results):
        for g_eager, g_replayed in zip(eager, replayed):
            assert np.array_equal(g_eager, g_replayed)
    assert np.array_equal(results[0][2][0], [0.0, 0.0, 0.0])  # d/da (0 ** b) = b * 0 ** (b - 1)
    assert np.array_equal(results[0][2][1], [0.0, 0.0, 0.0])  # d/db (0 ** b), b >= 0: convention


def test_capture_replays_a_where_condition_computed_in_the_step():
    """tm.where converted its condition with asarray, which turned the traced mask of a
    captured step into a plain array: every replay reused the capturing call's condition,
    for the value and the gradient, without a word."""
    results = []
    for captured in (False, True):
        a = tm.tensor(np.array([0.5, 2.0, 1.0]), requires_grad=True)

        def step(x, a=a):
            a.grad = None
            y = tm.where(x > 0, a * 2.0, a * 3.0)
            y.sum().backward()
            return y, a.grad

        run = tm.capture(step) if captured else step
        signs = ([1.0, 1.0, 1.0], [-1.0, 1.0, -1.0])
        results.append([[t.numpy().copy() for t in run(tm.tensor(np.array(s)))] for s in signs])
    assert run.captures == 1
    assert np.array_equal(results[0][1][1], [3.0, 2.0, 3.0])
    for eager, replayed in zip(*results):
        for t_eager, t_replayed in zip(eager, replayed):
            assert np.array_equal(t_eager, t_replayed)


def test_capture_replays_the_mask_of_clip():
    """Clip's backward built its mask with ``mask &= x >= lo`` on a fresh np.ones: the capture
    recorded the in-place call into an array it did not follow, and every replay used the
    capturing call's mask (the gradient of clip at the old values). Such a write is now
    refused while capturing, and Clip builds its mask out of place."""
    results = []
    for captured in (False, True):
        p = tm.tensor(np.array([1.3, -0.7, -0.62, 0.04]), requires_grad=True)

        def step(x, p=p):
            p.grad = None
            ((p + x).clip(-1.0, -0.5) * np.array([1.0, 2.0, 3.0, 4.0])).sum().backward()
            return p.grad

        run = tm.capture(step) if captured else step
        shifts = ([0.0, 0.0, 0.0, 0.0], [-2.0, 1.0, 0.0, -0.6])
        results.append([run(tm.tensor(np.array(s))).numpy().copy() for s in shifts])
    assert run.captures == 1
    assert np.array_equal(results[0][1], [1.0, 0.0, 3.0, 4.0])
    for eager, replayed in zip(*results):
        assert np.array_equal(eager, replayed)


def test_capture_refuses_an_in_place_write_into_an_array_it_does_not_follow():
    """The general case behind Clip's: a refusal, not a silently stale replay."""
    from tinymeta.function import Function as Op

    class Positive(Op):  # y = x * [x > 0], its mask built in place on a fresh array
        def forward(self, x):
            return x * (x > 0)

        def backward(self, gy):
            mask = np.ones(gy.shape, dtype=bool)
            mask &= self.inputs[0].data > 0
            return gy * mask

    w = tm.tensor(np.array([1.0, -1.0]), requires_grad=True)

    def step(x):
        w.grad = None
        Positive.apply(w + x).sum().backward()
        return w.grad

    with pytest.raises(CaptureError, match="writes a computed value into an array"):
        tm.capture(step)(tm.tensor(np.zeros(2)))


def test_capture_returns_the_replayed_grad_read_after_an_optimizer_step():
    """A .grad handed to Optimizer.step() kept a plain array for the rest of the capture, so a
    step that returned it (or computed from it) after opt.step() had it read as a constant:
    every replay returned the capturing call's gradient."""
    from tinymeta.optim import SGD

    results = []
    for captured in (False, True):
        a = tm.tensor(np.array([1.0, -0.3]), requires_grad=True)
        opt = SGD([a], lr=1e-2)

        def step(x, a=a, opt=opt):
            opt.zero_grad()
            ((a + x) ** 3.0).sum().backward()
            opt.step()
            return a.grad, (a.grad * a.grad).sum()

        run = tm.capture(step) if captured else step
        shifts = ([0.0, 0.0], [0.5, -0.2], [-1.0, 0.4])
        results.append([[t.numpy().copy() for t in run(tm.tensor(np.array(s)))] for s in shifts])
    assert run.captures == 1
    for eager, replayed in zip(*results):
        for t_eager, t_replayed in zip(eager, replayed):
            assert np.array_equal(t_eager, t_replayed)


def test_second_order_capture_of_a_tensor_power_is_bit_identical_to_eager():
    """Pow's backward took the masked formula while capturing and the plain one in eager mode:
    the same values, but different graphs, so a second-order backward added its terms in
    another order and the captured meta-gradient differed from eager in the last bits."""
    results = []
    for captured in (False, True):
        a = tm.tensor(np.array([[0.03, 0.55, -0.74, -0.16]]), requires_grad=True)
        b = tm.tensor(
            np.array([[-0.48, 0.6, 0.04, -0.29], [-0.78, -0.26, 0.01, -0.28]]), requires_grad=True
        )

        def step(x, a=a, b=b):
            a.grad = b.grad = None
            base = 1 + (a + x) * (a + x)
            ga, gb = tm.grad((base**b).sum(), [a, b], create_graph=True)
            ((1 + (a - 0.1 * ga) ** 2) ** (b - 0.1 * gb)).sum().backward()
            return a.grad, b.grad

        run = tm.capture(step) if captured else step
        rng = np.random.default_rng(0)
        batches = [tm.tensor(0.3 * rng.standard_normal((1, 4))) for _ in range(3)]
        results.append([[g.numpy().copy() for g in run(x)] for x in batches])
    assert run.captures == 1
    for eager, replayed in zip(*results):
        for g_eager, g_replayed in zip(eager, replayed):
            assert np.array_equal(g_eager, g_replayed)


# --- in-place changes whose operand is the changed tensor itself (random in-place programs) ----


def test_assigning_a_tensor_into_itself_keeps_the_gradient():
    """x[...] = x recorded x itself, the SetItem's own output, as the assigned value: its
    gradient went nowhere and d sum(c * y) / dw was 0 instead of 2 c w."""
    from tinymeta.testing import check_grads

    def assign_into_itself(w):
        y = w * w
        y[:] = y
        return (y * tm.tensor(np.array([3.0, 5.0]))).sum()

    w = tm.tensor(np.array([1.0, 2.0]), requires_grad=True)
    assign_into_itself(w).backward()
    np.testing.assert_array_equal(w.grad.numpy(), [6.0, 20.0])
    check_grads(assign_into_itself, [np.array([1.0, 2.0])], order=3)


def test_filling_a_0d_tensor_with_itself_keeps_the_gradient():
    w = tm.tensor(np.array([2.0, 1.0]), requires_grad=True)
    y = (w * w).sum()
    y.fill_(y)  # the same route as y[...] = y
    (3.0 * y).backward()
    np.testing.assert_array_equal(w.grad.numpy(), [12.0, 6.0])


@pytest.mark.parametrize("method, sign", [("add_", 1.0), ("sub_", -1.0)])
def test_in_place_add_of_the_tensor_itself_times_alpha_is_differentiated(method, sign):
    """x.add_(x, alpha=a) scaled x before recording the change: a node that used x itself, whose
    gradient could not be routed once x had its new creator, so backward refused what
    x.add_(x) and PyTorch differentiate (d/dw of (1 + a) w^2)."""
    from tinymeta.testing import check_grads

    def add_itself(w):
        y = w * w
        getattr(y, method)(y, alpha=0.5)
        return (y * tm.tensor(np.array([3.0, 5.0]))).sum()

    w = tm.tensor(np.array([1.0, 2.0]), requires_grad=True)
    add_itself(w).backward()
    np.testing.assert_allclose(w.grad.numpy(), (1 + sign * 0.5) * 2 * np.array([3.0, 10.0]))
    check_grads(add_itself, [np.array([1.0, 2.0])], order=2)


def test_a_refused_zero_names_zero_():
    """zero_ went through fill_, and its refusals named fill_, an op the user did not call."""
    w = tm.tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = w * 2.0
    _ = y[:1]  # a view: the change would not reach its gradient
    with pytest.raises(RuntimeError, match=r"^zero_: .*shares memory with a view"):
        y.zero_()
    z = w * 2.0
    with tm.no_grad(), pytest.raises(RuntimeError, match=r"^zero_: .*no graph records"):
        z.zero_()


def test_a_stale_use_refusal_names_the_in_place_op_that_made_it():
    """A node that used y before y.add_(v) refused with 'a recorded SetItem (x[...] = value)',
    an assignment the user did not write; it names add_ now."""
    w = tm.tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = w * w
    s = y * 3.0  # uses y as it was
    y.add_(w)
    with pytest.raises(RuntimeError, match=r"SetItem \(x\.add_\(\.\.\.\)\) after \w+ used it"):
        (s.sum() + y.sum()).backward()
    z = w * w
    t = z * 3.0
    z[0] = w[1]
    with pytest.raises(RuntimeError, match=r"SetItem \(x\[\.\.\.\] = value\) after"):
        (t.sum() + z.sum()).backward()


def test_logsumexp_output_can_be_changed_in_place_with_its_gradient():
    # It was a reshape of an internal keepdims result, so counted as a view and refused.
    x = tm.tensor(np.random.default_rng(0).standard_normal((3, 4)), requires_grad=True)
    y = x.logsumexp(axis=1)
    y.mul_(2.0)
    (gx,) = tm.grad(y.sum(), [x])
    softmax = np.exp(x.numpy()) / np.exp(x.numpy()).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(gx.numpy(), 2.0 * softmax, rtol=1e-12)


def test_a_leaf_hook_records_nothing_in_a_plain_backward():
    """Leaf hooks ran in the caller's grad mode: a hook's g * w gave .grad a graph after a
    backward without create_graph (PyTorch's .grad has none), so the next backward made a new
    .grad instead of accumulating into the one an optimizer holds."""
    x = tm.tensor(np.array([1.0, 2.0]), requires_grad=True)
    w = tm.tensor(np.array([3.0, 4.0]), requires_grad=True)
    x.register_hook(lambda g: g * w)
    (x * x).sum().backward()
    assert not x.grad.requires_grad and x.grad.grad_fn is None
    held = x.grad
    (x * x).sum().backward()
    assert x.grad is held
    np.testing.assert_array_equal(held.numpy(), 2 * (2 * np.array([1.0, 2.0]) * [3.0, 4.0]))


def test_create_graph_under_no_grad_keeps_the_grad_differentiable():
    """backward(create_graph=True) called under no_grad: the leaf hook's product and the sum
    into an existing .grad ran in the caller's mode, unrecorded, so .grad silently lost its
    graph (PyTorch's engine records them). .grad = 2 * 3x^2 twice = 12x^2; its gradient is
    24x, times 2 by the hook, which runs in tm.grad too (as PyTorch's leaf hooks do): 48x."""
    x = tm.tensor(np.array([1.0, 2.0]), requires_grad=True)
    x.register_hook(lambda g: g * 2.0)
    out = (x * x * x).sum()
    with tm.no_grad():
        out.backward(retain_graph=True, create_graph=True)  # .grad = 2 * 3x^2
        assert x.grad.requires_grad
        out.backward(create_graph=True)  # .grad = 2 * 3x^2 + 2 * 3x^2, recorded
    assert x.grad.requires_grad
    (second,) = tm.grad(x.grad.sum(), x)
    np.testing.assert_allclose(x.grad.numpy(), 12 * np.array([1.0, 4.0]), rtol=1e-12)
    np.testing.assert_allclose(second.numpy(), 48 * np.array([1.0, 2.0]), rtol=1e-12)


def test_a_gradient_a_hook_kept_is_not_changed_by_a_later_backward():
    """A hook that keeps its argument (a logger) was handed the very tensor that became .grad
    (a leaf's hook), or an array .grad was a view of (a hook on x.reshape(...)): the next
    backward added into .grad in place and the logged gradient silently became the sum.
    (PyTorch clones in the first case and not in the second.)"""
    x = tm.tensor(np.array([1.0, 2.0, 3.0, 4.0]), requires_grad=True)
    y = x.reshape(2, 2)
    logged = {"x": [], "y": []}
    x.register_hook(logged["x"].append)
    y.register_hook(logged["y"].append)
    w = tm.tensor(np.array([[1.0, 2.0], [3.0, 4.0]]))
    (y * w).sum().backward(retain_graph=True)
    (y * w).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0, 6.0, 8.0])
    for g in logged["x"] + logged["y"]:
        np.testing.assert_array_equal(g.numpy().ravel(), [1.0, 2.0, 3.0, 4.0])
    with tm.no_grad():
        x.grad.mul_(0.0)  # an optimizer's in-place write reaches no logged gradient either
    np.testing.assert_array_equal(logged["x"][0].numpy(), [1.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize(
    "shapes", [((3, 4), (4,)), ((4,), (4, 3)), ((4,), (4,)), ((2, 3, 4), (4,)), ((4,), (2, 4, 3))]
)
def test_matmul_with_a_vector_can_be_changed_in_place(shapes):
    """h = W @ x; h *= 2 (or h += b): the result used to be a reshape of an internal product,
    refused as a view. Values and gradients to second order match the out-of-place form."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s) for s in shapes]

    def run(in_place):
        a, b = (tm.tensor(x, requires_grad=True) for x in arrays)
        h = a @ b
        if in_place:
            h.mul_(2.0)
            h += 1.0
        else:
            h = h * 2.0 + 1.0
        loss = (h * h * h).sum()
        ga, gb = tm.grad(loss, [a, b], create_graph=True)
        gga = tm.grad((ga * ga).sum() + (gb * gb).sum(), [a])[0]
        return [t.numpy() for t in (h, ga, gb, gga)]

    for x, y in zip(run(True), run(False)):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)
