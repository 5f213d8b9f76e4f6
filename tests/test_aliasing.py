"""One version counter per storage: an in-place change through any alias is seen.

Views (basic indexing, reshape/flatten/squeeze/unsqueeze/expand_dims,
transpose/.T/swapaxes, broadcast_to, single-operand einsum), ``detach()``,
``Tensor(t)`` and ``from_numpy`` over one NumPy array share their base's
version counter; a copy keeps its own. The op-table property (every op, every
alias kind) is in test_ops.py; these are the direct cases.
"""

from __future__ import annotations

import numpy as np
import pytest

import tinymeta as tm
from tinymeta.optim import SGD, Adam
from tinymeta.tensor import FRESH

STALE = r"modified in place after the forward"

ALIASES = {
    "a[:2]": lambda a: a[:2],
    "a[...]": lambda a: a[...],
    "a[None]": lambda a: a[None],
    "detach": lambda a: a.detach(),
    "reshape": lambda a: a.reshape(2, 2),
    "flatten": lambda a: a.reshape(2, 2).flatten(),
    "unsqueeze": lambda a: a.unsqueeze(0),
    "expand_dims": lambda a: tm.expand_dims(a, -1),
    "squeeze": lambda a: a.reshape(1, 4).squeeze(),
    "T": lambda a: a.reshape(2, 2).T,
    "transpose": lambda a: a.reshape(2, 2).transpose(),
    "swapaxes": lambda a: a.reshape(2, 2).swapaxes(0, 1),
    "einsum ij->ji": lambda a: tm.einsum("ij->ji", a.reshape(2, 2)),
    "Tensor(t)": lambda a: tm.Tensor(a),
    "a view of a view": lambda a: a.reshape(2, 2).T[1:],
}

CHANGES = {
    "add_": lambda t: t.add_(1.0),
    "sub_": lambda t: t.sub_(1.0),
    "mul_": lambda t: t.mul_(0.0),
    "copy_": lambda t: t.copy_(np.full(t.shape, 7.0)),
    "zero_": lambda t: t.zero_(),
    "fill_": lambda t: t.fill_(3.0),
    "__setitem__": lambda t: t.__setitem__(..., 5.0),
}


def _saved():
    a = tm.tensor(np.ones(4))
    w = tm.tensor(np.arange(4.0), requires_grad=True)
    return a, w, (a * w).sum()  # Mul saved a


@pytest.mark.parametrize(
    "change",
    [
        lambda a: a[:2].mul_(0),
        lambda a: a.detach().mul_(2),
        lambda a: a.reshape(2, 2).mul_(3),
        lambda a: a.T.mul_(5),
    ],
    ids=["a[:2].mul_(0)", "a.detach().mul_(2)", "a.reshape(2, 2).mul_(3)", "a.T.mul_(5)"],
)
def test_the_issues_examples_raise(change):
    a, w, y = _saved()
    with tm.no_grad():
        change(a)
    with pytest.raises(RuntimeError, match=r"Mul: input 0 .*" + STALE):
        y.backward()
    assert w.grad is None


@pytest.mark.parametrize("method", CHANGES)
@pytest.mark.parametrize("alias", ALIASES)
def test_a_change_through_any_alias_raises(alias, method):
    a, w, y = _saved()
    view = ALIASES[alias](a)
    assert np.shares_memory(view.data, a.data)
    before = a._version
    with tm.no_grad():
        CHANGES[method](view)
    assert a._version == view._version == before + 1
    with pytest.raises(RuntimeError, match=STALE):
        y.backward()


@pytest.mark.parametrize("alias", ALIASES)
def test_a_change_of_the_base_reaches_a_saved_alias(alias):
    a = tm.tensor(np.ones(4))
    view = ALIASES[alias](a)
    w = tm.tensor(np.ones(view.shape), requires_grad=True)
    y = (view * w).sum()  # Mul saved the alias
    with tm.no_grad():
        a.mul_(2.0)
    with pytest.raises(RuntimeError, match=STALE):
        y.backward()


def test_broadcast_to_shares_the_counter():
    a = tm.tensor(np.ones((3, 1)))
    w = tm.tensor(np.ones((3, 4)), requires_grad=True)
    b = a.broadcast_to((3, 4))
    y = (b * w).sum()  # Mul saved b, a read-only view of a
    with tm.no_grad():
        a.mul_(2.0)
    with pytest.raises(RuntimeError, match=r"Mul: input 0 .*" + STALE):
        y.backward()


def test_an_alias_made_after_a_change_starts_from_the_current_version():
    a = tm.tensor(np.ones(4))
    with tm.no_grad():
        a.add_(1.0)
    v = a[1:]
    assert v._version == a._version == 1
    with tm.no_grad():
        v.add_(1.0)
    assert a._version == 2


def test_a_copy_keeps_a_counter_of_its_own():
    # reshape of non-contiguous data copies; a fancy index copies: changing the copy leaves
    # the original (and the graphs that saved it) alone, and the gradients are unchanged.
    a = tm.from_numpy(np.arange(6.0).reshape(2, 3).T)  # a transposed (non-contiguous) array
    w = tm.tensor(np.ones(6), requires_grad=True)
    y = (a.reshape(-1) * w).sum()
    for copy in (a.reshape(-1), a[np.array([0, 1])], a * 1.0):
        assert not np.shares_memory(copy.data, a.data)
        with tm.no_grad():
            copy.mul_(0.0)
    assert a._version == 0
    y.backward()
    np.testing.assert_array_equal(w.grad.numpy(), np.arange(6.0).reshape(2, 3).T.reshape(-1))


def test_from_numpy_over_one_array_shares_the_counter():
    array = np.ones(4)
    a = tm.from_numpy(array)
    w = tm.tensor(np.arange(4.0), requires_grad=True)
    y = (a * w).sum()
    other = tm.from_numpy(array[2:])  # a view of the same array
    with tm.no_grad():
        other.mul_(3.0)
    with pytest.raises(RuntimeError, match=STALE):
        y.backward()
    # Separate arrays: separate counters.
    b, c = tm.from_numpy(np.ones(2)), tm.from_numpy(np.ones(2))
    with tm.no_grad():
        b.add_(1.0)
    assert c._version == 0


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1), lambda ps: Adam(ps, lr=0.1)])
def test_an_optimizer_step_on_a_parameter_reaches_graphs_that_saved_an_alias(make):
    w = tm.tensor(np.ones(4), requires_grad=True)
    x = tm.tensor(np.arange(4.0), requires_grad=True)
    y = (w.reshape(2, 2).T * x.reshape(2, 2)).sum()  # Mul saved a view of w
    opt = make([w])
    w.grad = tm.tensor(np.ones(4))
    opt.step()
    with pytest.raises(RuntimeError, match=STALE):
        y.backward()


def test_a_pickled_tensor_can_still_be_changed_and_aliased():
    import pickle

    t = pickle.loads(pickle.dumps(tm.tensor(np.ones(3))))
    v = t[1:]
    with tm.no_grad():
        t.add_(1.0)
    assert t._version == v._version == 1


def test_version_counter_stays_out_of_the_hot_path():
    """A fresh op output has no counter object until it is aliased or changed."""
    x = tm.tensor(np.ones(3), requires_grad=True)
    y = x * 2.0
    assert y._vc is FRESH and y._version == 0
    v = y[1:]
    assert y._vc is v._vc and y._vc == [0, True]


# --- a view to the tensor's own shape is a tensor of its own ---------------------------------

SAME_SHAPE = {
    "reshape": lambda x: x.reshape(x.shape),
    "tm.reshape": lambda x: tm.reshape(x, x.shape),
    "broadcast_to": lambda x: x.broadcast_to(x.shape),
    "squeeze (nothing to squeeze)": lambda x: x.squeeze(),
    "flatten (one axis)": lambda x: x.flatten(1, 1),
}


@pytest.mark.parametrize("view", SAME_SHAPE.values(), ids=SAME_SHAPE.keys())
def test_the_gradient_with_respect_to_a_same_shape_view_counts_only_its_own_uses(view):
    # PyTorch makes a new view here; were y x itself, dL/dy would be dL/dx = 2x + 3.
    x = tm.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    y = view(x)
    assert y is not x and y.shape == x.shape
    seen = []
    y.register_hook(lambda g: seen.append(g.numpy().copy()))
    loss = (x * x).sum() + (3.0 * y).sum()
    gy, gx = tm.grad(loss, [y, x], retain_graph=True)
    np.testing.assert_array_equal(gy.numpy(), np.full((2, 3), 3.0))
    np.testing.assert_array_equal(gx.numpy(), 2 * np.arange(6.0).reshape(2, 3) + 3.0)
    assert len(seen) == 1 and np.array_equal(seen[0], np.full((2, 3), 3.0))


@pytest.mark.parametrize("view", SAME_SHAPE.values(), ids=SAME_SHAPE.keys())
def test_a_same_shape_view_without_grad_is_its_own_leaf_and_shares_memory(view):
    x = tm.tensor(np.ones((2, 3)))
    y = view(x)
    y.requires_grad_()  # y becomes a leaf; x must not start requiring grad through it
    assert not x.requires_grad
    (gy,) = tm.grad((y * x).sum(), [y])
    np.testing.assert_array_equal(gy.numpy(), x.numpy())
    x.add_(1.0)  # a view: the change is seen through y, and counted on y's version
    np.testing.assert_array_equal(y.numpy(), np.full((2, 3), 2.0))
    assert y._version == x._version == 1


def test_a_cast_of_a_parameter_detached_into_a_new_leaf_trains():
    """``p.astype(...).detach().requires_grad_()`` (on the GPU: ``p.to("cuda")...``) is
    PyTorch's way to make a parameter from another: the cast's output is a temporary that
    no graph can use again, so an optimizer may change its memory."""
    p = tm.tensor(np.arange(3.0), requires_grad=True)
    for make in (lambda ps: SGD(ps, lr=0.1, momentum=0.9), lambda ps: Adam(ps, lr=0.1)):
        w = p.astype("float32").detach().requires_grad_()
        ref = tm.tensor(np.arange(3.0, dtype=np.float32), requires_grad=True)
        for param in (w, ref):
            opt = make([param])
            for _ in range(3):
                opt.zero_grad()
                (param * param).sum().backward()
                opt.step()
        np.testing.assert_array_equal(w.data, ref.data)


def test_an_alias_of_computed_memory_is_refused_while_a_computed_tensor_over_it_lives():
    x = tm.tensor(np.ones(3), requires_grad=True)
    y = x * 2.0
    view = y[1:]  # a computed view holds y (its creator keeps its input)
    z = y.detach()
    del y
    with tm.no_grad(), pytest.raises(RuntimeError, match="alias .* of a computed tensor"):
        z.add_(1.0)
    np.testing.assert_array_equal(view.data, [2.0, 2.0])  # the refusal changed nothing
    del view
    with tm.no_grad():
        z.add_(1.0)  # nothing computed over the memory is left: z's alone
    np.testing.assert_array_equal(z.data, [3.0, 3.0, 3.0])


def test_a_copy_of_an_alias_of_computed_memory_is_its_own():
    import copy
    import pickle

    x = tm.tensor(np.ones(3), requires_grad=True)
    y = x * 2.0
    z = y.detach()
    for twin in (copy.deepcopy(z), pickle.loads(pickle.dumps(z))):
        with tm.no_grad():
            twin.add_(1.0)  # new memory, which no graph computed
        np.testing.assert_array_equal(twin.data, [3.0, 3.0, 3.0])
    np.testing.assert_array_equal(y.data, [2.0, 2.0, 2.0])
    with tm.no_grad(), pytest.raises(RuntimeError, match="of a computed tensor"):
        z.add_(1.0)  # y still lives
