"""Gradients handed out by ``grad`` and stored by ``backward`` are writable and own their
memory: an in-place change of one changes nothing else (another gradient, an output
gradient passed in, a saved tensor), with or without ``create_graph``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymeta as tm
from tinymeta import nn
from tinymeta.testing import strategies as tms


def f64(values, requires_grad=True):
    return tm.tensor(np.asarray(values, dtype=np.float64), requires_grad=requires_grad)


def _writable_and_apart(grads, others=()):
    """Every gradient writable; no two (nor one and any of ``others``) share memory."""
    arrays = [g.data for g in grads]
    for i, a in enumerate(arrays):
        assert a.flags.writeable, f"gradient {i} is read-only"
        for j, b in enumerate(arrays[:i]):
            assert not np.shares_memory(a, b), f"gradients {j} and {i} share memory"
        for o in others:
            assert not np.shares_memory(a, o), f"gradient {i} shares memory with an input"


@pytest.mark.parametrize("create_graph", [False, True])
def test_the_gradient_of_a_mean_is_writable(create_graph):
    x = f64(np.ones(3))
    (g,) = tm.grad(x.mean(), x, create_graph=create_graph)
    with tm.no_grad():
        g.add_(1.0)
    np.testing.assert_allclose(g.numpy(), np.full(3, 1.0 + 1.0 / 3))


@pytest.mark.parametrize("create_graph", [False, True])
def test_backward_gives_each_leaf_its_own_buffer(create_graph):
    a, b = f64([3.0, 4.0]), f64([0.0, 0.0])
    (a + b).sum().backward(create_graph=create_graph)
    assert not np.shares_memory(a.grad.data, b.grad.data)
    # clip_grad_norm_ scales each buffer once: total norm sqrt(4) = 2 -> each grad * 0.5
    total = nn.utils.clip_grad_norm_([a, b], max_norm=1.0)
    assert total.item() == pytest.approx(2.0)
    np.testing.assert_allclose(a.grad.numpy(), [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(b.grad.numpy(), [0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize("create_graph", [False, True])
def test_grad_of_two_inputs_never_alias(create_graph):
    a, b = f64([1.0, 2.0]), f64([3.0, 4.0])
    ga, gb = tm.grad((a + b).sum(), [a, b], create_graph=create_graph)
    _writable_and_apart([ga, gb])
    with tm.no_grad():
        ga.mul_(10.0)
    np.testing.assert_array_equal(gb.numpy(), [1.0, 1.0])
    # The same input twice: two gradients, two buffers.
    g1, g2 = tm.grad((a * 2.0).sum(), [a, a], create_graph=create_graph)
    _writable_and_apart([g1, g2])


@pytest.mark.parametrize("create_graph", [False, True])
def test_an_output_gradient_passed_in_is_not_handed_back(create_graph):
    x = f64([1.0, 2.0])
    gy = tm.tensor(np.array([5.0, 6.0]))
    (g,) = tm.grad(x + 1.0, x, grad_outputs=gy, create_graph=create_graph)
    assert not np.shares_memory(g.data, gy.data)
    with tm.no_grad():
        g.zero_()
    np.testing.assert_array_equal(gy.numpy(), [5.0, 6.0])
    (g,) = tm.grad(x.reshape(2, 1), x, grad_outputs=gy.reshape(2, 1))  # a view of gy
    assert not np.shares_memory(g.data, gy.data)


def test_create_graph_copies_stay_differentiable():
    a, b = f64([1.0, 2.0]), f64([3.0, 4.0])
    ga, gb = tm.grad((a * b + b).sum(), [a, b], create_graph=True)
    # gb = a + 1 and ga = b; differentiate sum(ga * gb) = sum(b * (a + 1)) again
    da, db = tm.grad((ga * gb).sum(), [a, b])
    np.testing.assert_array_equal(da.numpy(), [3.0, 4.0])
    np.testing.assert_array_equal(db.numpy(), [2.0, 3.0])
    # A broadcast (read-only) first-order gradient is copied by a recorded op.
    (g,) = tm.grad((a * a).mean() * 0.0 + a.sum() * b.sum(), a, create_graph=True)
    assert g.data.flags.writeable
    (h,) = tm.grad(g.sum(), b)
    np.testing.assert_array_equal(h.numpy(), [2.0, 2.0])


def test_changing_a_gradient_leaves_saved_tensors_alone():
    w = f64([1.0, 2.0])
    x = f64([3.0, 4.0])
    y = (w * x).sum()
    gw, gx = tm.grad(y, [w, x], retain_graph=True)
    with tm.no_grad():
        gw.add_(100.0)
        gx.add_(100.0)
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])
    np.testing.assert_array_equal(x.numpy(), [3.0, 4.0])
    gw2, gx2 = tm.grad(y, [w, x])  # the graph still holds the forward values
    np.testing.assert_array_equal(gw2.numpy(), [3.0, 4.0])
    np.testing.assert_array_equal(gx2.numpy(), [1.0, 2.0])


def test_accumulating_into_one_gradient_leaves_the_others_alone():
    a = f64([1.0, 2.0])
    b = f64([1.0, 2.0])
    (a + b).sum().backward()  # the backward of + hands both the same array: copied apart
    first = a.grad
    (a * 2.0).sum().backward()
    assert a.grad is first and not np.shares_memory(a.grad.data, b.grad.data)
    np.testing.assert_array_equal(a.grad.numpy(), [3.0, 3.0])
    np.testing.assert_array_equal(b.grad.numpy(), [1.0, 1.0])


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_gradients_of_shape_ops_are_writable_and_apart(data):
    """Ops whose backward hands on a view of the incoming gradient (reshape, transpose,
    broadcast, sum) or the same gradient to several inputs (add, concatenate)."""
    shape = data.draw(tms.shapes(min_dims=1, max_dims=3, max_side=3))
    x = f64(data.draw(tms.arrays(shape)))
    z = f64(data.draw(tms.arrays(shape)))
    ops = {
        "add": lambda x, z: x + z,
        "reshape": lambda x, z: x.reshape(-1) + z.reshape(-1),
        "T": lambda x, z: x.T + z.T,
        "broadcast": lambda x, z: x.broadcast_to((2,) + shape) - z,
        "sum": lambda x, z: x.sum() + z.sum(),
        "mean": lambda x, z: tm.mean(x) * tm.mean(z),
        "concatenate": lambda x, z: tm.concatenate([x, z]),
        "stack": lambda x, z: tm.stack([x, z, x]),
    }
    name = data.draw(st.sampled_from(sorted(ops)), label="op")
    create_graph = data.draw(st.booleans(), label="create_graph")
    y = ops[name](x, z)
    gy = tm.tensor(np.ones(y.shape))
    grads = tm.grad(y, [x, z, x], grad_outputs=gy, create_graph=create_graph)
    _writable_and_apart(grads, others=[x.data, z.data, gy.data])
    for g in grads:
        with tm.no_grad():
            if g.grad_fn is None:
                g.add_(1.0)  # must not raise
            else:  # create_graph and a gradient that depends on the inputs (mean * mean):
                # a computed tensor, which no_grad may not change in place (test_adversarial)
                with pytest.raises(RuntimeError, match="in-place change of a tensor computed"):
                    g.add_(1.0)


# --- accumulation into an existing .grad ---------------------------------------------------


def test_a_second_backward_accumulates_into_the_grad_buffer_itself():
    """As in PyTorch: without create_graph the sum is written into .grad's memory, so a
    reference taken after the first backward sees it (an optimizer holding it, a user's)."""
    w = tm.tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    (w * w).sum().backward()
    held = w.grad
    (w * 3.0).sum().backward()
    assert w.grad is held
    np.testing.assert_array_equal(held.numpy(), [5.0, 7.0, 9.0])


def test_accumulation_bumps_the_version_a_graph_saved():
    w = tm.tensor(np.array([1.0, 2.0]), requires_grad=True)
    v = tm.tensor(np.array([0.5, 0.5]), requires_grad=True)
    (w * w).sum().backward()
    uses_grad = (w.grad * v).sum()  # Mul saved w.grad
    (w * 2.0).sum().backward()
    with pytest.raises(RuntimeError, match="modified in place"):
        uses_grad.backward()


def test_a_differentiable_grad_is_never_written_in_place():
    """A .grad made by backward(create_graph=True) has a graph: the next sum is a new tensor
    (recorded with create_graph, plain without), and the old one keeps its values."""
    w = tm.tensor(np.array([1.0, 2.0]), requires_grad=True)
    (w**3).sum().backward(create_graph=True)
    first = w.grad
    first_values = first.numpy().copy()
    (w * 2.0).sum().backward()
    assert w.grad is not first and w.grad.grad_fn is None
    np.testing.assert_array_equal(first.numpy(), first_values)
    np.testing.assert_array_equal(w.grad.numpy(), 3 * np.array([1.0, 4.0]) + 2.0)
    (w**3).sum().backward(create_graph=True)
    assert w.grad.grad_fn is not None  # the recorded sum: still differentiable
