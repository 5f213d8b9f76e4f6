"""In-place arithmetic (``add_``, ``sub_``, ``mul_``, ``div_``, ``pow_``, ``copy_`` and
``+=``, ``-=``, ``*=``, ``/=``, ``**=``): written into the tensor's memory, as in PyTorch and
NumPy, and recorded when it has to be differentiated.

Before, ``x += w`` made a new tensor (aliases of ``x`` did not see it, and the PyTorch loop
``p -= lr * p.grad`` left the model's parameters alone), and ``x.add_(w)`` with ``w``
requiring grad wrote ``w``'s values but dropped its gradient, without a word.
"""

from __future__ import annotations

import operator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymeta as tm
from tinymeta.testing import check_grads, gradcheck, gradgradcheck

RNG = np.random.default_rng(0)

# name -> (the in-place method, the augmented operator, the out-of-place operator)
OPS = {
    "add": (lambda x, o: x.add_(o), operator.iadd, operator.add),
    "sub": (lambda x, o: x.sub_(o), operator.isub, operator.sub),
    "mul": (lambda x, o: x.mul_(o), operator.imul, operator.mul),
    "div": (lambda x, o: x.div_(o), operator.itruediv, operator.truediv),
    "pow": (lambda x, o: x.pow_(o), operator.ipow, operator.pow),
}


def f64(values, requires_grad=False):
    return tm.tensor(np.asarray(values, dtype=np.float64), requires_grad=requires_grad)


def _positive(shape):
    return RNG.uniform(0.5, 2.0, shape)  # pow and div stay defined and smooth


# --- values and aliases: NumPy's semantics ----------------------------------------------------


@pytest.mark.parametrize("form", ["method", "operator"])
@pytest.mark.parametrize("name", OPS)
def test_a_view_changed_in_place_changes_its_base_as_in_numpy(name, form):
    method, augmented, _ = OPS[name]
    change = method if form == "method" else augmented
    base, other = _positive((4, 3)), _positive((3,))
    x = f64(base)
    view = x[1:3]
    result = change(view, f64(other))
    expected = base.copy()
    np_view = expected[1:3]
    augmented(np_view, other)  # NumPy, in place through its own view
    np.testing.assert_array_equal(x.numpy(), expected)
    assert result is view and x._version == 1 and view._version == 1


@pytest.mark.parametrize("name", OPS)
def test_a_python_scalar_and_an_array_operand(name):
    method, augmented, _ = OPS[name]
    for other in (1.5, _positive((2, 1))):
        base = _positive((2, 3))
        x = f64(base)
        assert method(x, other) is x
        expected = base.copy()
        augmented(expected, other)
        np.testing.assert_array_equal(x.numpy(), expected)


def test_the_pytorch_manual_sgd_loop_updates_the_model():
    rng = np.random.default_rng(1)
    model = tm.nn.Linear(3, 2, dtype=tm.float64, rng=rng)
    twin = tm.nn.Linear(3, 2, dtype=tm.float64, rng=np.random.default_rng(1))
    x = tm.tensor(rng.standard_normal((5, 3)))
    for m in (model, twin):
        (m(x) ** 2).sum().backward()
    with tm.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad  # the idiom: must change the tensor the model holds
    tm.optim.SGD(twin.parameters(), lr=0.1).step()
    for p, q in zip(model.parameters(), twin.parameters()):
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=0, atol=1e-15)
        assert p.grad is not None  # the same tensor object, stepped in place


def test_augmented_assignment_keeps_the_object():
    x = f64([1.0, 2.0])
    alias = x
    x += 1.0
    x *= 3.0
    assert x is alias
    np.testing.assert_array_equal(alias.numpy(), [6.0, 9.0])


# --- recorded: gradients as of the out-of-place op ---------------------------------------------


@pytest.mark.parametrize("form", ["method", "operator"])
@pytest.mark.parametrize("name", OPS)
def test_recorded_gradients_orders_1_to_3(name, form):
    method, augmented, _ = OPS[name]
    change = method if form == "method" else augmented

    def fn(a, w):
        x = a * 1.5  # computed: it may be changed in place with grad mode on
        x = change(x, w)
        return x * x

    inputs = [f64(_positive((3, 2)), True), f64(_positive((2,)), True)]
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)
    assert check_grads(fn, inputs, order=3)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(OPS)),
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    other_shape=st.sampled_from(["same", "row", "scalar"]),
    seed=st.integers(0, 2**16),
)
def test_recorded_gradients_equal_the_out_of_place_ones(name, rows, cols, other_shape, seed):
    method, _, out_of_place = OPS[name]
    rng = np.random.default_rng(seed)
    shape = {"same": (rows, cols), "row": (cols,), "scalar": ()}[other_shape]
    a0, w0 = rng.uniform(0.5, 2.0, (rows, cols)), rng.uniform(0.5, 2.0, shape)
    gy = rng.standard_normal((rows, cols))
    grads = []
    for in_place in (True, False):
        a, w = f64(a0, True), f64(w0, True)
        x = a * 1.5 + 0.25  # ops that keep no copy of x (tanh keeps its output: refused)
        y = method(x, w) if in_place else out_of_place(x, w)
        g = tm.grad((y * y * tm.tensor(gy)).sum(), [a, w], create_graph=True)
        gg = tm.grad(sum((gi * gi).sum() for gi in g), [a, w])  # a second order too
        grads.append([t.numpy() for t in (*g, *gg)])
        assert (y is x) == in_place
    for got, expected in zip(*grads):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_a_tensor_that_required_no_grad_takes_the_operand_gradient():
    """The old silent bug: x.add_(w) kept x out of the graph and dropped w's gradient."""
    x = tm.zeros(3, dtype=tm.float64)
    w = f64([1.0, 2.0, 3.0], True)
    x.add_(w)
    assert x.requires_grad and x.grad_fn is not None
    (x * w).sum().backward()  # d/dw sum((0 + w) * w) = 2w
    np.testing.assert_array_equal(w.grad.numpy(), [2.0, 4.0, 6.0])


def test_copy_of_a_tensor_that_requires_grad_is_recorded():
    def fn(a, w):
        x = a * 2.0
        x.copy_(w)  # broadcast into x: w's gradient is summed over the rows
        return (x * a).sum()

    inputs = [f64(_positive((3, 2)), True), f64(_positive((2,)), True)]
    assert check_grads(fn, inputs, order=2)
    a, w = (f64(v.numpy(), True) for v in inputs)
    x = a * 2.0
    x.copy_(w)
    (x * a).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), a.numpy().sum(axis=0))
    np.testing.assert_allclose(a.grad.numpy(), np.broadcast_to(w.numpy(), (3, 2)))


@pytest.mark.parametrize("name", ["mul", "div", "pow", "add"])
def test_the_tensor_as_its_own_operand(name):
    """x.mul_(x): the operand is x as it was, not the values being written."""
    method, _, out_of_place = OPS[name]
    a0 = _positive((2, 3))
    results = []
    for in_place in (True, False):
        a = f64(a0, True)
        x = a * 1.0
        y = method(x, x) if in_place else out_of_place(x, x)
        (g,) = tm.grad(y.sum(), [a])
        results.append((y.numpy().copy(), g.numpy()))
    for got, expected in zip(*results):
        np.testing.assert_allclose(got, expected, rtol=1e-14)


# --- refused, with the reason ------------------------------------------------------------------


def test_a_leaf_that_requires_grad_is_refused_with_grad_mode_on():
    w = f64([1.0, 2.0], True)
    with pytest.raises(RuntimeError, match=r"add_: in-place change of a tensor that requires grad"):
        w += 1.0
    with pytest.raises(RuntimeError, match=r"mul_: .*leaf of shape \(2,\)"):
        w.mul_(2.0)
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])
    assert w._version == 0
    with tm.no_grad():
        w *= 2.0  # what optimizers do
    np.testing.assert_array_equal(w.numpy(), [2.0, 4.0])


def test_an_integer_tensor_cannot_hold_a_float_result():
    x = tm.tensor(np.array([1, 2, 3]))
    with pytest.raises(TypeError, match=r"div_: .*tensor of shape \(3,\), dtype int64"):
        x /= 2
    with pytest.raises(TypeError, match=r"add_: .*dtype int64"):
        x += 0.5
    w = f64([1.0, 2.0, 3.0], True)
    said = r"mul_: the value requires grad but the tensor \(shape \(3,\)\) has dtype int64"
    with pytest.raises(TypeError, match=said):
        x.mul_(w)
    np.testing.assert_array_equal(x.numpy(), [1, 2, 3])
    x += 2  # int into int stays exact
    np.testing.assert_array_equal(x.numpy(), [3, 4, 5])


def test_an_operand_that_does_not_fit_is_refused_before_any_write():
    x = f64(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"add_: the other operand of shape \(4, 2, 3\) does not"):
        x += np.ones((4, 2, 3))
    with pytest.raises(
        ValueError, match=r"mul_: .*shape \(3, 3\) does not broadcast to .*\(2, 3\)"
    ):
        x.mul_(f64(np.ones((3, 3)), True))
    np.testing.assert_array_equal(x.numpy(), np.ones((2, 3)))
    assert x._version == 0 and not x.requires_grad


def test_a_recorded_change_of_a_view_is_refused():
    a = f64(np.ones((3, 2)), True)
    x = a * 1.0
    row = x[0]
    with pytest.raises(RuntimeError, match=r"sub_: .*shares memory with a view"):
        row -= a[1]
    np.testing.assert_array_equal(x.numpy(), np.ones((3, 2)))


def test_a_use_from_before_the_change_is_refused_at_backward():
    a = f64([1.0, 2.0], True)
    x = a * 1.0
    y = x * a  # Mul saved x as it was
    x += a
    with pytest.raises(
        RuntimeError, match=r"Mul: input 0 .* changed in place by a recorded SetItem"
    ):
        y.sum().backward()
    t = a.tanh()  # Tanh saves its output, which the change overwrites (PyTorch refuses too)
    t.mul_(2.0)
    with pytest.raises(RuntimeError, match=r"Tanh: output 0 .* modified in place"):
        t.sum().backward()


def test_a_computed_tensor_changed_without_a_graph_is_refused():
    a = f64([1.0, 2.0], True)
    y = a * 2.0
    with tm.no_grad():
        with pytest.raises(RuntimeError, match=r"add_: in-place change of a tensor computed by"):
            y += 1.0
    np.testing.assert_array_equal(y.numpy(), [2.0, 4.0])


def test_a_captured_step_with_in_place_arithmetic_replays_bit_for_bit():
    """The recorded change (x += w inside the loss) and the manual update (p -= lr * g under
    no_grad) both replay as array calls."""

    def make():
        w = f64(np.linspace(0.5, 1.5, 3), True)

        def step(x):
            w.grad = None
            h = x * 1.0
            h *= w  # recorded: w gets its gradient through it
            h += 0.5
            loss = (h * h).sum()
            loss.backward()
            with tm.no_grad():
                for p in [w]:
                    p -= 0.01 * p.grad
            return loss

        return step, w

    data = [RNG.standard_normal((4, 3)) for _ in range(4)]
    (eager, w_eager), (captured, w_captured) = make(), make()
    captured = tm.capture(captured)
    for x in data:
        le, lc = eager(tm.tensor(x)), captured(tm.tensor(x))
        assert le.numpy() == lc.numpy()
        np.testing.assert_array_equal(w_eager.numpy(), w_captured.numpy())
    assert not np.array_equal(w_eager.numpy(), np.linspace(0.5, 1.5, 3))  # it did train


def test_fill_and_zero_of_a_computed_tensor_are_recorded():
    a = f64([1.0, 2.0], True)
    c = f64(5.0, True)
    y = a * 3.0
    y.fill_(c)  # y no longer depends on a: only the product below does
    (y * a).sum().backward()
    np.testing.assert_array_equal(a.grad.numpy(), [5.0, 5.0])
    assert c.grad.numpy() == 3.0
    z = a * 2.0
    z.zero_()
    (g,) = tm.grad((z + a).sum(), [a])
    np.testing.assert_array_equal(g.numpy(), [1.0, 1.0])
    with pytest.raises(ValueError, match=r"fill_: the value must be a number or a 0-d tensor"):
        z.fill_(f64([1.0, 2.0]))
    with pytest.raises(RuntimeError, match=r"fill_: .*leaf of shape \(2,\)"):
        a.fill_(0.0)


def test_a_captured_step_that_copies_and_fills_in_place():
    """copy_ and fill_ under no_grad inside a captured step (a target network's update)."""

    def make():
        w = f64(np.linspace(0.5, 1.5, 3), True)
        target = f64(np.zeros(3))
        marks = f64(np.zeros(3))

        def step(x):
            w.grad = None
            loss = (((x * w).sum(axis=0) - target) ** 2).sum()
            loss.backward()
            with tm.no_grad():
                w.sub_(w.grad, alpha=0.01)
                target.copy_(w * 0.5)
                marks.fill_(2.0)
            return loss

        return step, (w, target, marks)

    (eager, eager_state), (captured, captured_state) = make(), make()
    captured = tm.capture(captured)
    for x in [RNG.standard_normal((4, 3)) for _ in range(4)]:
        assert eager(tm.tensor(x)).numpy() == captured(tm.tensor(x)).numpy()
        for a, b in zip(eager_state, captured_state):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert captured.captures == 1
