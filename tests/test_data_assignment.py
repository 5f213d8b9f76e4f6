"""Assigning ``t.data = array``: the tensor gets new memory, with a version of its own.

A graph that saved the tensor's old array refuses backward (as after an in-place change);
aliases made before the assignment (``detach()``, views) keep the old array and their
graphs stay valid; a computed tensor whose array was replaced is no longer its creator's
output, so no gradient reaches the creator through it. Memory another tensor handed out
(``t.data = u.data``, a view of it, ``u.detach().data``) keeps one version counter for both
tensors: an in-place change through either is seen by the graphs of both. Plain uses (a
parameter's new values between optimizer steps, ``Module.to``) keep working. Gradients are
checked against float64 central differences.
"""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest

import tinymeta as tm

RNG = np.random.default_rng(0)


def f64(values, requires_grad=True):
    return tm.tensor(np.asarray(values, dtype=np.float64), requires_grad=requires_grad)


def central_difference(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """d f / d x of a scalar NumPy function, element by element."""
    grad = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        step = np.zeros_like(x)
        step[i] = eps
        grad[i] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


# --- a graph that saved the old array refuses backward ---------------------------------------


def test_leaf_replaced_after_forward_refuses_backward():
    w = f64([1.0, 2.0, 3.0])
    y = (w * w).sum()
    w.data = np.array([10.0, 20.0, 30.0])  # y was computed at [1, 2, 3]
    with pytest.raises(RuntimeError, match=r"Mul: input 0 .*\.data was replaced"):
        y.backward()


def test_message_names_the_tensor_shape_and_versions():
    w = tm.Tensor(np.ones((2, 3), dtype=np.float32), requires_grad=True, name="weight")
    y = (w.exp() * w).sum()
    w.data = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(RuntimeError) as info:
        y.backward()
    message = str(info.value)
    assert "'weight'" in message and "(2, 3)" in message and "float32" in message
    assert "version 0 -> 1" in message and "recompute the forward" in message.lower()


def test_output_saved_by_its_creator_refuses_backward():
    x = f64([0.5, -1.0])
    y = x.exp()  # Exp's backward reads its output y
    total = y.sum()
    y.data = np.zeros(2)
    with pytest.raises(RuntimeError, match=r"Exp: output 0 .*\.data was replaced"):
        total.backward()


def test_assignment_with_new_shape_and_dtype_is_allowed_and_refused_at_backward():
    w = f64([1.0, 2.0])
    y = (w * w).sum()
    w.data = np.ones((3, 2), dtype=np.float32)  # allowed, as in PyTorch
    assert w.shape == (3, 2) and w.dtype == np.float32
    with pytest.raises(RuntimeError, match=r"\.data was replaced"):
        y.backward()


def test_replacing_by_the_same_array_changes_nothing():
    w = f64([1.0, 2.0])
    y = (w * w).sum()
    w.data = w.data
    y.backward()
    np.testing.assert_allclose(w.grad.numpy(), [2.0, 4.0])


def test_replaced_twice_then_put_back_still_refuses():
    """The values match again, but the graph cannot know: versions only grow."""
    w = f64([1.0, 2.0])
    original = w.data
    y = (w * w).sum()
    w.data = original + 1.0
    w.data = original
    with pytest.raises(RuntimeError, match=r"\.data was replaced"):
        y.backward()


def test_in_place_change_after_a_replacement_is_reported_as_in_place():
    w = f64([1.0, 2.0])
    w.data = np.array([3.0, 4.0])
    y = (w * w).sum()  # saved after the replacement
    with tm.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place") as info:
        y.backward()
    assert ".data was replaced" not in str(info.value)


# --- a computed tensor whose array was replaced ----------------------------------------------


def test_use_after_replacement_does_not_reach_the_creator():
    x = f64([1.0, 2.0])
    y = x * 2.0
    y.data = np.array([5.0, 7.0])  # no longer x * 2: z below does not depend on x
    z = (y * y).sum()
    with pytest.raises(RuntimeError, match=r"Mul: input 0 .*\.data replaced after Scale computed"):
        z.backward()


def test_root_with_replaced_data_refuses_backward():
    x = f64([1.0, 2.0])
    y = (x * 2.0).sum()
    y.data = np.array(0.0)
    with pytest.raises(RuntimeError, match=r"backward from a tensor .*\.data replaced after Sum"):
        y.backward()


def test_use_between_two_replacements_does_not_reach_the_creator():
    x = f64([1.0, 2.0])
    y = x * 2.0
    y.data = np.array([5.0, 7.0])
    z = (y + 1.0).sum()  # uses the first replacement
    y.data = np.array([0.0, 0.0])
    with pytest.raises(RuntimeError, match=r"had its \.data replaced after Scale computed it"):
        z.backward()


def test_use_before_replacement_keeps_its_gradient():
    """z was computed from y as Mul made it, and Add does not read y: z's gradient holds."""
    xa = np.array([1.0, -2.0, 0.5])
    x = f64(xa)
    y = x * x
    z = (y + 1.0).sum()
    y.data = np.zeros(3)
    z.backward()
    expected = central_difference(lambda v: np.sum(v * v + 1.0), xa)
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6)


# --- aliases keep the old array ----------------------------------------------------------------


def test_graph_of_a_detached_alias_survives_the_base_replacement():
    wa = np.array([1.0, 2.0, -1.0])
    w = f64(wa.copy(), requires_grad=False)
    a = w.detach().requires_grad_()
    y = (a * a * a).sum()
    w.data = np.zeros(3)  # a still holds the old array, unchanged
    y.backward()
    np.testing.assert_array_equal(a.numpy(), wa)
    expected = central_difference(lambda v: np.sum(v**3), wa)
    np.testing.assert_allclose(a.grad.numpy(), expected, rtol=1e-6)


def test_graph_through_a_view_survives_the_base_replacement():
    wa = np.array([1.0, 2.0, -1.0, 3.0])
    w = f64(wa.copy())
    v = w[1:]  # a view of w's old memory
    y = (v * v).sum()
    w.data = np.full(4, 9.0)
    y.backward()
    expected = central_difference(lambda u: np.sum(u[1:] ** 2), wa)
    np.testing.assert_allclose(w.grad.numpy(), expected, rtol=1e-6)


def test_in_place_change_of_an_old_alias_leaves_the_new_memory_alone():
    """After the assignment the tensor and its old alias hold different arrays: a change
    through the alias does not touch the values a graph saved from the tensor."""
    w = f64([1.0, 2.0], requires_grad=False)
    alias = w.detach()
    w.data = np.array([3.0, -4.0])
    w.requires_grad_()
    y = (w * w).sum()
    alias.add_(100.0)
    y.backward()
    np.testing.assert_allclose(w.grad.numpy(), [6.0, -8.0])
    np.testing.assert_array_equal(alias.numpy(), [101.0, 102.0])


def test_in_place_change_of_the_new_memory_leaves_old_alias_graphs_alone():
    w = f64([1.0, 2.0], requires_grad=False)
    a = w.detach().requires_grad_()
    y = (a * a).sum()
    w.data = np.array([3.0, 4.0])
    w.add_(1.0)
    y.backward()
    np.testing.assert_allclose(a.grad.numpy(), [2.0, 4.0])


# --- plain uses -----------------------------------------------------------------------------


def test_parameter_replaced_between_steps_gets_the_gradient_at_its_new_values():
    xa = np.array([[0.5, -1.0], [2.0, 1.5]])
    w = f64([0.1, 0.2])
    opt = tm.optim.SGD([w], lr=0.1)
    for new in (np.array([1.0, -1.0]), np.array([0.3, 0.7])):
        w.data = new.copy()
        opt.zero_grad()
        loss = ((tm.tensor(xa) @ w) ** 2).sum()
        loss.backward()
        expected = central_difference(lambda v: np.sum((xa @ v) ** 2), new)
        np.testing.assert_allclose(w.grad.numpy(), expected, rtol=1e-6)
        opt.step()
        np.testing.assert_allclose(w.numpy(), new - 0.1 * expected, rtol=1e-6)


def test_module_to_refuses_a_graph_recorded_before_the_cast():
    layer = tm.nn.Linear(2, 1)
    loss = layer(tm.tensor(np.ones((1, 2), dtype=np.float32))).sum()
    layer.to(dtype=tm.float64)
    with pytest.raises(RuntimeError, match=r"\.data was replaced"):
        loss.backward()
    fresh = layer(tm.tensor(np.ones((1, 2)))).sum()  # a forward after the cast works
    fresh.backward()
    assert layer.weight.grad.dtype == np.float64


# --- what may be assigned -------------------------------------------------------------------


def test_assigning_a_tensor_is_refused_with_a_hint():
    w = f64([1.0, 2.0])
    with pytest.raises(TypeError, match=r"\.data = .*expected an array.*got Tensor"):
        w.data = f64([3.0, 4.0], requires_grad=False)


def test_integer_array_into_a_tensor_that_requires_grad_is_refused():
    w = f64([1.0, 2.0])
    with pytest.raises(TypeError, match=r"requires grad.*int64"):
        w.data = np.array([1, 2])
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])  # unchanged


# --- memory another tensor handed out: one counter for both tensors ---------------------------

# How ``t`` gets ``u``'s memory: the whole array, a NumPy view of it, through a detached alias.
HANDED_OUT = {
    "u.data": lambda u: u.data,
    "u.data[1:]": lambda u: u.data[1:],
    "u.detach().data": lambda u: u.detach().data,
}

# In-place changes of a leaf, as a user or an optimizer makes them (grad mode off).
IN_PLACE = {
    "add_": lambda x: x.add_(1.0),
    "mul_": lambda x: x.mul_(2.0),
    "fill_": lambda x: x.fill_(0.5),
    "x[0] = v": lambda x: x.__setitem__(0, 7.0),
}


@pytest.mark.parametrize("handed", HANDED_OUT.values(), ids=list(HANDED_OUT))
@pytest.mark.parametrize("change", IN_PLACE.values(), ids=list(IN_PLACE))
def test_change_through_the_source_is_seen_by_graphs_of_the_receiver(handed, change):
    u = f64([1.0, 2.0, 3.0, 4.0])
    t = f64([0.0, 0.0, 0.0], requires_grad=False)
    t.data = handed(u)
    t.requires_grad_()
    y = (t.exp() * t).sum()  # Mul saved t (and Exp its output, a copy)
    with tm.no_grad():
        change(u)
    with pytest.raises(RuntimeError, match=r"Mul: input 1 .*modified in place"):
        y.backward()


@pytest.mark.parametrize("handed", HANDED_OUT.values(), ids=list(HANDED_OUT))
@pytest.mark.parametrize("change", IN_PLACE.values(), ids=list(IN_PLACE))
def test_change_through_the_receiver_is_seen_by_graphs_of_the_source(handed, change):
    u = f64([1.0, 2.0, 3.0, 4.0])
    y = (u * u).sum()  # Mul saved u
    t = f64([0.0, 0.0, 0.0], requires_grad=False)
    t.data = handed(u)
    with tm.no_grad():
        change(t)
    with pytest.raises(RuntimeError, match=r"Mul: input 0 .*modified in place"):
        y.backward()


@pytest.mark.parametrize("handed", HANDED_OUT.values(), ids=list(HANDED_OUT))
def test_sharing_without_in_place_changes_keeps_both_gradients(handed):
    """No false alarm: the source's graph recorded before the assignment, and the
    receiver's graph recorded after it, both differentiate at the shared values."""
    ua = np.array([0.5, -1.0, 2.0, 1.5])
    u = f64(ua.copy())
    y_u = (u * u * u).sum()
    t = f64([9.0], requires_grad=False)
    t.data = handed(u)
    t.requires_grad_()
    y_t = (t.sin() * t).sum()
    y_u.backward()
    y_t.backward()
    np.testing.assert_allclose(u.grad.numpy(), central_difference(lambda v: np.sum(v**3), ua))
    ta = t.numpy().copy()
    expected = central_difference(lambda v: np.sum(np.sin(v) * v), ta)
    np.testing.assert_allclose(t.grad.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("t_changes, u_changes", [(0, 0), (3, 0), (0, 3), (2, 5)])
def test_graph_of_the_old_array_refuses_whatever_the_two_versions(t_changes, u_changes):
    """t takes u's counter: its version must land past every version t's graphs saved,
    whether u's counter is behind t's or ahead of it."""
    u = f64([1.0, 2.0], requires_grad=False)
    t = f64([3.0, 4.0], requires_grad=False)
    with tm.no_grad():
        for _ in range(t_changes):
            t.mul_(1.0)
        for _ in range(u_changes):
            u.mul_(1.0)
    t.requires_grad_()
    y = (t * t).sum()
    t.data = u.data
    with pytest.raises(RuntimeError, match=r"Mul: input 0 .*\.data was replaced") as info:
        y.backward()
    assert f"version {t_changes} -> {max(t_changes + 1, u_changes)}" in str(info.value)


def test_optimizer_step_on_the_source_is_seen_by_graphs_of_the_receiver():
    u = f64([1.0, -2.0])
    t = f64([0.0, 0.0], requires_grad=False)
    t.data = u.data
    t.requires_grad_()
    y = (t * t).sum()
    u.grad = tm.tensor(np.array([0.5, 0.5]))
    tm.optim.SGD([u], lr=0.1).step()
    np.testing.assert_allclose(t.numpy(), [0.95, -2.05])  # one memory
    with pytest.raises(RuntimeError, match=r"Mul: input 0 .*modified in place"):
        y.backward()


def test_memory_passed_on_twice_keeps_one_counter():
    u = f64([1.0, 2.0, 3.0], requires_grad=False)
    t = f64([0.0], requires_grad=False)
    s = f64([0.0], requires_grad=False)
    t.data = u.data
    s.data = t.data[1:]
    s.requires_grad_()
    y = (s * s).sum()
    with tm.no_grad():
        u.add_(1.0)
    with pytest.raises(RuntimeError, match=r"Mul: input 0 .*modified in place"):
        y.backward()


def test_memory_of_a_computed_tensor_is_not_changed_behind_its_graph():
    """t holding y's memory is an alias of a computed tensor, like y.detach()."""
    x = f64([1.0, 2.0])
    y = x * 3.0
    t = f64([0.0, 0.0], requires_grad=False)
    t.data = y.data
    with tm.no_grad(), pytest.raises(RuntimeError, match=r"mul_: in-place change of an alias"):
        t.mul_(10.0)
    np.testing.assert_array_equal(y.numpy(), [3.0, 6.0])


def test_deep_copies_keep_the_memory_and_the_counter_shared():
    u = f64([1.0, 2.0], requires_grad=False)
    t = f64([0.0, 0.0], requires_grad=False)
    t.data = u.data
    u2, t2 = copy.deepcopy([u, t])
    t2.requires_grad_()
    y = (t2 * t2).sum()
    with tm.no_grad():
        u2.add_(1.0)
    np.testing.assert_array_equal(t2.numpy(), [2.0, 3.0])
    with pytest.raises(RuntimeError, match=r"Mul: input 0 .*modified in place"):
        y.backward()


def test_memory_no_tensor_handed_out_gets_a_counter_of_its_own():
    u = f64([1.0, 2.0], requires_grad=False)
    t = f64([0.0, 0.0], requires_grad=False)
    t.data = np.array([5.0, 6.0])
    t.requires_grad_()
    y = (t * t).sum()
    with tm.no_grad():
        u.add_(1.0)  # other memory
    y.backward()
    np.testing.assert_allclose(t.grad.numpy(), [10.0, 12.0])


def test_records_of_handed_out_memory_go_with_the_memory():
    tensor_module = importlib.import_module("tinymeta.tensor")  # (tm.tensor is a function)
    before = len(tensor_module._handed_out)
    for _ in range(50):
        a = tm.tensor(np.ones(3))
        a.data[1:]  # noqa: B018 (reading .data records the memory)
        t = f64([0.0], requires_grad=False)
        t.data = a.data
    del a, t
    assert len(tensor_module._handed_out) <= before + 1


@pytest.mark.parametrize("handed", HANDED_OUT.values(), ids=list(HANDED_OUT))
def test_from_numpy_over_handed_out_memory_shares_the_counter(handed):
    """``from_numpy(u.data)`` is another way to share u's memory: one counter, as for
    ``t.data = u.data``, in both directions."""
    u = f64([1.0, 2.0, 3.0, 4.0])
    t = tm.from_numpy(handed(u)).requires_grad_()
    y_t = (t.exp() * t).sum()
    with tm.no_grad():
        u.mul_(2.0)
    with pytest.raises(RuntimeError, match=r"Mul: input 1 .*modified in place"):
        y_t.backward()
    v = f64([1.0, 2.0, 3.0, 4.0])
    y_v = (v * v).sum()
    w = tm.from_numpy(handed(v))
    with tm.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match=r"Mul: input 0 .*modified in place"):
        y_v.backward()
