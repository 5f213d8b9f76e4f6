"""Item assignment ``x[index] = v``: recorded as a differentiable op when it has to be.

As in PyTorch: the assigned positions take their gradient from ``v`` (summed to
``v``'s shape when ``v`` is broadcast into the slot), the other positions pass the
gradient through to ``x`` as it was; ``x`` keeps its identity and gets a new
creator. Checked against finite differences at orders 1 to 3 for basic,
integer-array and boolean indices.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymeta as tm
from tinymeta.testing import check_grads, gradcheck, gradgradcheck
from tinymeta.testing import strategies as tms

RNG = np.random.default_rng(0)


def f64(values, requires_grad=True):
    return tm.tensor(np.asarray(values, dtype=np.float64), requires_grad=requires_grad)


# index, shape of x, shape of v (v broadcast into the slot where it is smaller)
CASES = {
    "basic slice": ((slice(1, 3),), (4, 3), (2, 3)),
    "basic int and slice": ((1, slice(None, None, 2)), (3, 4), (2,)),
    "basic, v broadcast": ((slice(None), 1), (3, 4), ()),
    "basic, v a row broadcast": ((slice(0, 2),), (3, 4), (1, 4)),
    "ellipsis and None": ((Ellipsis, None, 0), (2, 3), (2, 1)),
    "int array": ((np.array([2, 0]),), (4, 3), (2, 3)),
    "int array, negative": ((np.array([-1, 1]),), (4,), (2,)),
    "int array pair": ((np.array([0, 2, 1]), np.array([1, 0, 2])), (3, 3), (3,)),
    "int array, v broadcast": ((np.array([3, 1]),), (4, 3), (3,)),
    "bool mask": ((np.array([[True, False, True], [False, True, True]]),), (2, 3), (4,)),
    "bool rows, v broadcast": ((np.array([True, False, True]),), (3, 2), (1, 2)),
    "int tensor index": ((tm.tensor([1, 3]),), (4, 2), (2, 2)),
}


def _assigned(index, x_shape, v_shape):
    """(w, v) -> (w * 1.5) with [index] = v, then squared: x requires grad through an op."""

    def fn(w, v):
        x = w * 1.5
        x[index] = v
        return x * x

    return fn


def _inputs(x_shape, v_shape):
    return [f64(RNG.standard_normal(x_shape)), f64(RNG.standard_normal(v_shape))]


@pytest.mark.parametrize("name", CASES)
def test_gradients_orders_1_to_3(name):
    index, x_shape, v_shape = CASES[name]
    fn = _assigned(index, x_shape, v_shape)
    inputs = _inputs(x_shape, v_shape)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)
    assert check_grads(fn, inputs, order=3)


@pytest.mark.parametrize("name", CASES)
def test_gradient_values_follow_the_rule(name):
    """gx = gy with the slot zeroed, gv = gy[index] summed to v's shape."""
    index, x_shape, v_shape = CASES[name]
    w, v = _inputs(x_shape, v_shape)
    x = w * 2.0
    x[index] = v
    gy = RNG.standard_normal(x_shape)
    gw, gv = tm.grad(x, [w, v], grad_outputs=tm.tensor(gy))
    np_index = tuple(i.numpy() if isinstance(i, tm.Tensor) else i for i in index)
    mask = np.ones(x_shape)
    mask[np_index] = 0.0
    np.testing.assert_allclose(gw.numpy(), 2.0 * gy * mask)
    slot = gy[np_index]
    expected = tm.tensor(slot).sum_to(v_shape[max(len(v_shape) - slot.ndim, 0) :]).numpy()
    np.testing.assert_allclose(gv.numpy(), expected.reshape(v_shape))


def test_assign_into_a_constant_makes_it_depend_on_the_value():
    out = tm.zeros(2, 3, dtype=tm.float64)
    v = f64([1.0, 2.0, 3.0])
    out[1] = v
    assert out.requires_grad and not out.is_leaf and out.grad_fn.op_name() == "SetItem"
    np.testing.assert_array_equal(out.numpy(), [[0, 0, 0], [1, 2, 3]])
    (out * out).sum().backward()
    np.testing.assert_array_equal(v.grad.numpy(), [2.0, 4.0, 6.0])


def test_the_tensor_keeps_its_identity_and_gets_a_new_creator():
    w = f64([1.0, 2.0, 3.0])
    x = w * 2.0
    creator, ident = x.grad_fn, id(x)
    x[0] = f64(7.0)
    assert id(x) == ident and x.grad_fn is not creator and x.grad_fn.op_name() == "SetItem"
    (before, value) = x.grad_fn.inputs
    assert before.grad_fn is creator and before is not x
    assert creator.outputs[0]() is before  # the old creator's output is the stand-in now


def test_a_constant_value_into_a_non_leaf_stops_the_gradient_there():
    w = f64([1.0, 2.0, 3.0])
    x = w * 3.0
    x[1] = 0.5  # PyTorch: recorded, the assigned position no longer depends on w
    (gw,) = tm.grad(x.sum(), w)
    np.testing.assert_array_equal(gw.numpy(), [3.0, 0.0, 3.0])
    assert check_grads(lambda w: _set_const(w * 3.0), [f64([1.0, 2.0, 3.0])], order=3)


def _set_const(x):
    x[np.array([True, False, True])] = 0.25
    return x * x


def test_repeated_assignments_chain():
    w = f64(np.arange(4.0))
    a, b = f64(10.0), f64([20.0, 30.0])

    def fn(w, a, b):
        x = w * 1.0
        x[0] = a
        x[2:] = b
        x[1] = a * b[0]
        return x * w

    assert check_grads(fn, [w, a, b], order=3)
    y = fn(w, a, b)
    np.testing.assert_array_equal(y.numpy(), [0.0, 200.0 * 1.0, 40.0, 90.0])


def test_value_of_another_dtype_is_cast_and_its_gradient_too():
    x = tm.zeros(3, dtype=tm.float64)
    v = tm.tensor(np.array([1.0, 2.0], dtype=np.float32), requires_grad=True)
    x[:2] = v
    assert x.dtype == tm.float64
    (gv,) = tm.grad((x * x).sum(), v)
    assert gv.dtype == tm.float32
    np.testing.assert_array_equal(gv.numpy(), [2.0, 4.0])


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_random_int_and_bool_indices_orders_1_and_2(data):
    shape = data.draw(tms.shapes(min_dims=1, max_dims=3, max_side=4))
    n = shape[0]
    if data.draw(st.booleans(), label="bool"):
        index = (data.draw(tms.arrays((n,), dtype=np.bool_), label="mask"),)
    else:
        rows = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
        index = (np.array(rows),)
    slot = np.zeros(shape)[index].shape
    v_shape = data.draw(st.sampled_from([slot, slot[1:], ()]), label="v shape")
    w = f64(data.draw(tms.arrays(shape)))
    v = f64(data.draw(tms.arrays(v_shape)))
    assert check_grads(_assigned(index, shape, v_shape), [w, v], order=2)


# --- what is refused, and why -----------------------------------------------------------


def test_assigning_into_a_leaf_that_requires_grad_raises():
    w = f64([1.0, 2.0])
    with pytest.raises(RuntimeError, match=r"__setitem__: in-place change .*leaf.*no_grad"):
        w[0] = f64(3.0)
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])
    assert w._version == 0 and w.grad_fn is None
    with tm.no_grad():
        w[0] = 3.0  # allowed: not differentiated
    np.testing.assert_array_equal(w.numpy(), [3.0, 2.0])


def test_repeated_integer_indices_are_refused():
    x = tm.zeros(3, dtype=tm.float64)
    with pytest.raises(RuntimeError, match=r"more than once"):
        x[np.array([0, 2, 0])] = f64([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(x.numpy(), [0.0, 0.0, 0.0])
    x[np.array([0, 2, 0])] = 5.0  # nothing to differentiate: NumPy's assignment
    np.testing.assert_array_equal(x.numpy(), [5.0, 0.0, 5.0])


def test_assigning_into_memory_with_a_view_is_refused():
    # The view would not see the gradient of the assignment (PyTorch rebases views;
    # tinymeta refuses instead of giving a silently wrong gradient).
    out = tm.zeros(2, 3, dtype=tm.float64)
    with pytest.raises(RuntimeError, match=r"shares memory with a view"):
        out[0][1] = f64(1.0)  # out[0] is a view of out
    base = tm.zeros(2, 3, dtype=tm.float64)
    flat = base.reshape(-1)
    with pytest.raises(RuntimeError, match=r"shares memory with a view"):
        base[0] = f64([1.0, 2.0, 3.0])
    with pytest.raises(RuntimeError, match=r"shares memory with a view"):
        flat[0] = f64(1.0)
    copy = out * 1.0  # memory of its own: allowed
    copy[0, 1] = f64(1.0)
    assert copy.grad_fn.op_name() == "SetItem"


def test_integer_tensor_cannot_take_a_differentiable_value():
    x = tm.zeros(3, dtype=tm.int64)
    with pytest.raises(TypeError, match=r"__setitem__.*dtype int64"):
        x[0] = f64(1.0)


def test_value_of_a_wrong_shape_names_the_shapes():
    x = tm.zeros(3, dtype=tm.float64)
    with pytest.raises(ValueError, match=r"__setitem__: .*shape \(3,\).*shape \(2,\)"):
        x[:] = f64([1.0, 2.0])


def test_a_graph_that_saved_x_before_the_assignment_raises():
    w = f64([1.0, 2.0, 3.0])
    x = w * 1.0
    y = (x * w).sum()  # Mul saved x
    x[0] = f64(5.0)
    with pytest.raises(RuntimeError, match=r"Mul: input 0 .*(modified|changed) in place"):
        y.backward()


def test_a_graph_that_used_x_without_saving_it_raises_instead_of_misrouting():
    w = f64([1.0, 2.0, 3.0])
    v = f64(5.0)
    x = w * 1.0
    s = x.sum()  # Sum does not save x, but its gradient is meant for x as it was
    x[0] = v
    with pytest.raises(
        RuntimeError, match=r"Sum: input 0 .*changed in place by a recorded SetItem"
    ):
        tm.grad(s + x.sum(), [w, v])
    # Used after the assignment only: fine.
    (gw, gv) = tm.grad(x.sum(), [w, v])
    np.testing.assert_array_equal(gw.numpy(), [0.0, 1.0, 1.0])
    assert gv.item() == 1.0


def test_a_constant_used_before_it_took_a_value_needs_nothing_from_it():
    w = f64([1.0, 2.0])
    out = tm.zeros(2, dtype=tm.float64)
    y = (out + w).sum()  # out did not require grad: Add owes it no gradient
    out[0] = f64(3.0)
    y.backward()
    np.testing.assert_array_equal(w.grad.numpy(), [1.0, 1.0])


def test_a_saved_output_changed_by_assignment_raises():
    w = f64([0.5, 1.0])
    y = tm.exp(w)  # Exp's backward reads y
    y[0] = f64(2.0)
    with pytest.raises(RuntimeError, match=r"Exp: output 0 .*modified in place"):
        y.sum().backward()


def test_hooks_registered_before_the_assignment_see_the_old_tensors_gradient():
    w = f64([1.0, 2.0])
    x = w * 1.0
    seen = []
    x.register_hook(lambda g: seen.append(g.numpy().copy()))
    x[1] = f64(4.0)
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(seen[0], [3.0, 0.0])  # x as it was: position 1 overwritten
    np.testing.assert_array_equal(w.grad.numpy(), [3.0, 0.0])


def test_under_no_grad_nothing_is_recorded():
    v = f64([1.0, 2.0])
    x = tm.zeros(2, dtype=tm.float64)
    with tm.no_grad():
        x[:] = v
    assert not x.requires_grad and x.grad_fn is None and x._version == 1
    np.testing.assert_array_equal(x.numpy(), [1.0, 2.0])
