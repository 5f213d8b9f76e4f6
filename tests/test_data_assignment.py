"""Assigning ``t.data = array``: the tensor gets new memory, with a version of its own.

A graph that saved the tensor's old array refuses backward (as after an in-place change);
aliases made before the assignment (``detach()``, views) keep the old array and their
graphs stay valid; a computed tensor whose array was replaced is no longer its creator's
output, so no gradient reaches the creator through it. Plain uses (a parameter's new
values between optimizer steps, ``Module.to``) keep working. Gradients are checked
against float64 central differences.
"""

from __future__ import annotations

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
