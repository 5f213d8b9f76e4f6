"""The autograd engine: accumulation, deep graphs, grad mode, graph lifetime,
version counters, hooks, ``grad()`` and the dtype rules of API.md."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

import tinymeta as tm
from tinymeta.function import Function


def f64(values, requires_grad=True) -> tm.Tensor:
    return tm.tensor(values, dtype=tm.float64, requires_grad=requires_grad)


@pytest.fixture
def no_gc():
    """Garbage collection off: what is freed here is freed by reference counting alone."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --- accumulation and deep graphs ------------------------------------------------------------


def test_fan_out_accumulates_every_use():
    x = f64([1.0, -2.0, 3.0])
    y = x * x + 3.0 * x + x.sin() + x  # x used five times
    y.sum().backward()
    expected = 2 * x.numpy() + 3.0 + np.cos(x.numpy()) + 1.0
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-12)


def test_fan_out_through_a_shared_intermediate():
    x = f64([0.5, 1.5])
    h = x.exp()
    y = (h * h + h.tanh() + h).sum()  # h used four times, x only through h
    (g,) = tm.grad(y, x)
    e = np.exp(x.numpy())
    expected = (2 * e + (1 - np.tanh(e) ** 2) + 1) * e
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-12)


def test_many_uses_of_one_leaf():
    x = f64(2.0)
    y = tm.stack([x * float(k) for k in range(200)]).sum()
    y.backward()
    assert x.grad.item() == sum(range(200))


def test_100000_op_chain_backward_has_no_recursion():
    x = f64(1.0)
    y = x
    for _ in range(50_000):
        y = y * 1.00001
        y = y + 0.5
    assert y.grad_fn is not None and y.generation == 100_000
    y.backward()
    assert x.grad.item() == pytest.approx(1.00001**50_000, rel=1e-9)


def test_100000_op_chain_is_freed_without_recursion(no_gc):
    x = f64(1.0)
    y = x + 1.0
    first_node, first_output = weakref.ref(y.grad_fn), weakref.ref(y)
    for _ in range(100_000 - 1):
        y = y + 1.0
    assert first_node() is not None
    del y  # the whole chain goes at once: deallocation must not recurse 100,000 deep
    assert first_node() is None and first_output() is None


# --- grad mode ------------------------------------------------------------------------------------


def test_no_grad_records_nothing():
    x = f64([1.0, 2.0])
    with tm.no_grad():
        assert not tm.is_grad_enabled()
        y = (x * 2).exp().sum()
    assert tm.is_grad_enabled()
    assert y.grad_fn is None and not y.requires_grad and y.is_leaf


@pytest.mark.parametrize("parens", [True, False])
def test_no_grad_as_decorator(parens):
    def double(t):
        assert not tm.is_grad_enabled()
        return t * 2

    decorated = tm.no_grad()(double) if parens else tm.no_grad(double)
    x = f64([1.0])
    y = decorated(x)
    assert y.grad_fn is None and not y.requires_grad
    assert tm.is_grad_enabled()
    assert decorated.__name__ == "double"


def test_enable_grad_inside_no_grad():
    x = f64([1.0, 2.0])
    with tm.no_grad():
        with tm.enable_grad():
            y = x * 3
        z = x * 3
    assert y.grad_fn is not None and z.grad_fn is None
    (g,) = tm.grad(y.sum(), x)
    np.testing.assert_array_equal(g.numpy(), [3.0, 3.0])


def test_enable_grad_as_decorator_inside_no_grad():
    @tm.enable_grad
    def triple(t):
        return t * 3

    x = f64([1.0])
    with tm.no_grad():
        assert triple(x).grad_fn is not None


def test_grad_mode_restored_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with tm.no_grad():
            1 / 0  # noqa: B018
    assert tm.is_grad_enabled()


def test_set_grad_enabled():
    x = f64([1.0])
    with tm.set_grad_enabled(False):
        assert (x * 2).grad_fn is None
    with tm.set_grad_enabled(True):
        assert (x * 2).grad_fn is not None


# --- create_graph, accumulation into .grad ---------------------------------------------------


def test_create_graph_gradients_are_differentiable():
    x = f64([0.5, -1.0])
    (g,) = tm.grad((x**3).sum(), x, create_graph=True)
    assert g.requires_grad and g.grad_fn is not None
    np.testing.assert_allclose(g.numpy(), 3 * x.numpy() ** 2)
    (gg,) = tm.grad(g.sum(), x)
    np.testing.assert_allclose(gg.numpy(), 6 * x.numpy())


def test_without_create_graph_gradients_are_constants():
    x = f64([0.5, -1.0])
    (g,) = tm.grad((x**3).sum(), x)
    assert not g.requires_grad and g.grad_fn is None


def test_backward_create_graph_then_differentiate_grad():
    x = f64([2.0])
    (x**3).sum().backward(create_graph=True)
    assert x.grad.requires_grad
    (gg,) = tm.grad(x.grad.sum(), x)
    np.testing.assert_allclose(gg.numpy(), [12.0])


def test_backward_accumulates_across_calls():
    x = f64([1.0, 2.0])
    (x * x).sum().backward()
    (3 * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.numpy() + 3)


def test_only_leaves_that_require_grad_get_grad():
    x = f64([1.0, 2.0])
    c = f64([5.0, 6.0], requires_grad=False)
    h = x * c
    h.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [5.0, 6.0])
    assert h.grad is None and c.grad is None and not h.is_leaf


def test_grads_of_two_leaves_are_separate_writable_arrays():
    a, b = f64([1.0, 2.0]), f64([3.0, 4.0])
    (a + b).sum().backward()  # the same gradient reaches both, as a broadcast view
    assert a.grad.data.flags.writeable and b.grad.data.flags.writeable
    a.grad.mul_(10)
    np.testing.assert_array_equal(b.grad.numpy(), [1.0, 1.0])
    b.grad.zero_()
    np.testing.assert_array_equal(a.grad.numpy(), [10.0, 10.0])


def test_grad_is_not_the_callers_gradient_array():
    x = f64([1.0, 2.0])
    seed = tm.tensor([1.0, 1.0], dtype=tm.float64)
    x.backward(seed)
    x.grad.mul_(3)
    np.testing.assert_array_equal(seed.numpy(), [1.0, 1.0])


# --- retain_graph and freed graphs -------------------------------------------------------------


def test_retain_graph_allows_a_second_backward():
    x = f64([1.0, 2.0])
    y = (x.exp() * x).sum()
    y.backward(retain_graph=True)
    y.backward(retain_graph=True)
    y.backward()
    e = np.exp(x.numpy())
    np.testing.assert_allclose(x.grad.numpy(), 3 * (e * x.numpy() + e))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.backward()


def test_grad_frees_the_graph_by_default():
    x = f64([1.0])
    y = (x * x).sum()
    tm.grad(y, x)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        tm.grad(y, x)


def test_create_graph_retains_the_graph_by_default():
    x = f64([1.0])
    y = (x * x).sum()
    tm.grad(y, x, create_graph=True)
    (g,) = tm.grad(y, x)  # still there
    np.testing.assert_array_equal(g.numpy(), [2.0])


def test_part_of_graph_freed_by_grad_wrt_an_intermediate():
    x = f64([1.0])
    h = x.exp()
    y = (h * h).sum()
    tm.grad(y, h)  # runs (and frees) only the nodes between y and h
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()


def _loss_and_weakrefs(x):
    """A small graph whose intermediates are only reachable through the graph."""
    h = x.exp()
    z = h * h
    return z.sum(), weakref.ref(h), weakref.ref(h.data), weakref.ref(z.grad_fn)


def test_backward_frees_saved_intermediates(no_gc):
    x = f64([1.0, 2.0])
    loss, h, h_data, node = _loss_and_weakrefs(x)
    assert h() is not None and h_data() is not None  # saved for backward by the Mul
    loss.backward()
    assert h() is None and h_data() is None  # released by the backward pass itself
    assert node() is not None  # the node stays (without its buffers) while loss lives
    del loss
    assert node() is None  # no reference cycle keeps the graph alive


def test_retain_graph_keeps_saved_intermediates(no_gc):
    x = f64([1.0, 2.0])
    loss, h, _, _ = _loss_and_weakrefs(x)
    loss.backward(retain_graph=True)
    assert h() is not None
    del loss
    assert h() is None  # and the whole graph goes with its output, no gc needed


def test_unused_graph_is_freed_without_gc(no_gc):
    x = f64([1.0, 2.0])
    loss, h, h_data, node = _loss_and_weakrefs(x)
    del loss
    assert h() is None and h_data() is None and node() is None


def test_create_graph_gradient_graph_is_freed_without_gc(no_gc):
    x = f64([1.0, 2.0])
    loss, h, _, _ = _loss_and_weakrefs(x)
    (g,) = tm.grad(loss, x, create_graph=True)
    g_node = weakref.ref(g.grad_fn)
    del loss, g
    assert h() is None and g_node() is None


# --- in-place changes and the version counter -----------------------------------------------------

INPLACE = {
    "add_": lambda t: t.add_(1.0),
    "sub_": lambda t: t.sub_(1.0),
    "mul_": lambda t: t.mul_(2.0),
    "copy_": lambda t: t.copy_(np.full(t.shape, 7.0)),
    "zero_": lambda t: t.zero_(),
    "fill_": lambda t: t.fill_(3.0),
    "__setitem__": lambda t: t.__setitem__(0, 5.0),
}


@pytest.mark.parametrize("method", INPLACE)
def test_inplace_change_of_a_saved_input_raises(method):
    w = f64([1.0, 2.0])
    x = f64([3.0, 4.0])
    y = (w * x).sum()  # Mul saves w and x
    before = w._version
    with tm.no_grad():
        INPLACE[method](w)
    assert w._version == before + 1
    with pytest.raises(RuntimeError, match=r"Mul: input 0 .*modified in place"):
        y.backward()


@pytest.mark.parametrize("method", INPLACE)
def test_inplace_change_of_an_input_add_does_not_save_is_fine(method):
    w = f64([1.0, 2.0])
    x = f64([3.0, 4.0])
    y = (w + x).sum()  # Add needs only shapes
    with tm.no_grad():
        INPLACE[method](w)
    y.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, 1.0])


@pytest.mark.parametrize(
    "op", [tm.exp, tm.tanh, tm.sqrt, tm.sigmoid, lambda t: 1.0 / t, lambda t: t.max()]
)
def test_inplace_change_of_a_saved_output_raises(op):
    # These backward rules reuse the output (exp: gx = gy * y); changing it would give a
    # silently wrong gradient.
    # The change itself is refused now (y has a creator that would not see it).
    x = f64([1.0, 2.0])
    y = op(x)
    with pytest.raises(RuntimeError, match=r"output 0 .*modified in place|no graph records"):
        with tm.no_grad():
            y.mul_(2.0)
        tm.grad(y.sum(), x)


def test_inplace_change_of_a_constant_after_the_forward_raises():
    w = f64([1.0, 2.0], requires_grad=False)
    x = f64([3.0, 4.0])
    y = (w * x).sum()
    w[1] = 10.0  # allowed: w does not require grad; but Mul saved it
    with pytest.raises(RuntimeError, match="Mul: input 0"):
        y.backward()


@pytest.mark.parametrize("method", INPLACE)
def test_inplace_on_leaf_requiring_grad_under_grad_mode_raises(method):
    w = f64([1.0, 2.0])
    with pytest.raises(RuntimeError, match=r"in-place change of a tensor that requires grad"):
        INPLACE[method](w)
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])
    assert w._version == 0


def test_inplace_under_no_grad_changes_data_and_bumps_version():
    w = f64([1.0, 2.0])
    with tm.no_grad():
        w.add_(tm.tensor([1.0, 1.0], dtype=tm.float64), alpha=0.5)
        w.sub_(1.0)
        w[0] = 10.0
    np.testing.assert_array_equal(w.numpy(), [10.0, 1.5])
    assert w._version == 3


# --- hooks ----------------------------------------------------------------------------------------


def test_hook_is_called_with_the_gradient():
    x = f64([1.0, 2.0])
    seen = []
    x.register_hook(lambda g: seen.append(g.numpy().copy()))
    (x * x).sum().backward()
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], [2.0, 4.0])
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0])


def test_hook_can_replace_the_gradient():
    x = f64([1.0, 2.0])
    x.register_hook(lambda g: g * 10)
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [20.0, 40.0])


def test_hook_handle_remove():
    x = f64([1.0, 2.0])
    calls = []
    handle = x.register_hook(lambda g: calls.append(1) or g * 0)
    handle.remove()
    handle.remove()  # removing twice is harmless
    (x * x).sum().backward()
    assert calls == []
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0])


def test_hook_on_non_leaf_changes_what_flows_upstream():
    x = f64([1.0, 2.0])
    h = x * 3
    seen = []

    def hook(g):
        seen.append(g.numpy().copy())
        return g * 2

    h.register_hook(hook)
    (h * h).sum().backward()
    np.testing.assert_array_equal(seen[0], 2 * h.numpy())  # d/dh of sum(h^2)
    np.testing.assert_array_equal(x.grad.numpy(), 3 * 2 * (2 * h.numpy()))
    assert h.grad is None  # non-leaf: no .grad


def test_hook_on_non_leaf_sees_the_total_of_fan_out():
    x = f64([1.0])
    h = x * 2
    seen = []
    h.register_hook(lambda g: seen.append(g.item()))
    (h + h * 3).sum().backward()
    assert seen == [4.0]


def test_hooks_run_in_grad_and_on_grad_targets():
    x = f64([1.0, 2.0])
    h = x.exp()
    h.register_hook(lambda g: g * 0 + 1.0)
    (gh, gx) = tm.grad((h * h).sum(), [h, x])
    np.testing.assert_array_equal(gh.numpy(), [1.0, 1.0])
    np.testing.assert_allclose(gx.numpy(), h.numpy())  # upstream of the replaced gradient


def test_register_hook_needs_requires_grad():
    with pytest.raises(RuntimeError, match="does not require grad"):
        tm.ones(2).register_hook(lambda g: g)


def test_retain_grad_keeps_a_computed_tensors_gradient_as_pytorch():
    """retain_grad(): .grad after the tensor's other hooks (whatever their order), summed out
    of place across backward calls, stored by grad() calls whose walk passes it too, and
    differentiable after backward(create_graph=True) (values checked by hand: PyTorch gives
    the same, see tests/test_random_grad_buffers.py for the comparison)."""
    x = f64([1.0, 2.0])
    y = x * x
    y.retain_grad()
    y.register_hook(lambda g: g * 10.0)  # registered after retain_grad: it still runs first
    loss = (y * 3.0).sum()
    loss.backward(retain_graph=True)
    assert y.retains_grad and not x.retains_grad
    np.testing.assert_array_equal(y.grad.numpy(), [30.0, 30.0])
    np.testing.assert_array_equal(x.grad.numpy(), [60.0, 120.0])
    first = y.grad
    loss.backward(retain_graph=True)
    assert y.grad is not first  # out of place, as PyTorch's
    np.testing.assert_array_equal(first.numpy(), [30.0, 30.0])
    np.testing.assert_array_equal(y.grad.numpy(), [60.0, 60.0])
    tm.grad(loss, [x], retain_graph=True)
    np.testing.assert_array_equal(y.grad.numpy(), [90.0, 90.0])
    # differentiable: d/dx sum(y.grad) where y.grad = d sum(y^2)/dy = 2y = 2x^2 -> 4x
    z = x * x
    z.retain_grad()
    (z * z).sum().backward(create_graph=True)
    assert z.grad.requires_grad
    (gx,) = tm.grad(z.grad.sum(), [x])
    np.testing.assert_allclose(gx.numpy(), [4.0, 8.0], rtol=1e-12)


def test_retain_grad_follows_the_tensor_through_an_in_place_op():
    """As in PyTorch: the retained gradient is that of the new values, while a hook registered
    before the change sees the gradient of the old ones."""
    x = f64([1.0, 2.0])
    y = x * 1.0
    y.retain_grad()
    seen = []
    y.register_hook(seen.append)
    y.mul_(2.0)
    (y * 3.0).sum().backward()
    np.testing.assert_array_equal(y.grad.numpy(), [3.0, 3.0])
    np.testing.assert_array_equal(seen[0].numpy(), [6.0, 6.0])


def test_retained_gradients_are_buffers_of_their_own():
    a = f64([1.0, 1.0])
    b, c = a * 1.0, a * 1.0
    b.retain_grad()
    c.retain_grad()
    (b + c).sum().backward()  # the backward of + hands b and c the same array
    b.grad.add_(1.0)
    np.testing.assert_array_equal(c.grad.numpy(), [1.0, 1.0])
    np.testing.assert_array_equal(a.grad.numpy(), [2.0, 2.0])


def test_retain_grad_on_a_leaf_or_a_constant():
    x = f64([1.0])
    x.retain_grad()  # a no-op: leaves keep their gradient anyway
    assert not x.retains_grad and x._hooks is None
    (x * 2.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0])
    with pytest.raises(RuntimeError, match=r"retain_grad: the tensor \(shape \(2,\)\) does not"):
        tm.ones(2).retain_grad()


# --- grad() ---------------------------------------------------------------------------------------


def test_grad_allow_unused():
    x, unused = f64([1.0]), f64([2.0])
    with pytest.raises(RuntimeError, match=r"inputs\[1\] .*not used"):
        tm.grad((x * 2).sum(), [x, unused])
    gx, gu = tm.grad((x * 2).sum(), [x, unused], allow_unused=True)
    assert gu is None
    np.testing.assert_array_equal(gx.numpy(), [2.0])


def test_grad_wrt_intermediate_tensor():
    x = f64([1.0, 2.0])
    h = x * x
    y = (h.sin()).sum()
    (gh,) = tm.grad(y, h)
    np.testing.assert_allclose(gh.numpy(), np.cos(h.numpy()))
    assert x.grad is None


def test_grad_wrt_a_tensor_and_something_upstream_of_it():
    x = f64([1.0, 2.0])
    h = x.exp()
    y = (h * h).sum()
    gh, gx = tm.grad(y, [h, x])
    np.testing.assert_allclose(gh.numpy(), 2 * h.numpy())
    np.testing.assert_allclose(gx.numpy(), 2 * h.numpy() * h.numpy())
    # and in the other order
    x2 = f64([1.0, 2.0])
    h2 = x2.exp()
    gx2, gh2 = tm.grad((h2 * h2).sum(), [x2, h2])
    np.testing.assert_allclose(gx2.numpy(), gx.numpy())
    np.testing.assert_allclose(gh2.numpy(), gh.numpy())


def test_grad_with_grad_outputs_for_a_non_scalar():
    x = f64([1.0, 2.0, 3.0])
    y = x * x
    (g,) = tm.grad(y, x, grad_outputs=tm.tensor([1.0, 0.0, -1.0], dtype=tm.float64))
    np.testing.assert_array_equal(g.numpy(), [2.0, 0.0, -6.0])


def test_grad_of_multiple_outputs_sums_their_contributions():
    x = f64([1.0, 2.0])
    y1, y2 = (x * x).sum(), (3 * x).sum()
    (g,) = tm.grad([y1, y2], x)
    np.testing.assert_array_equal(g.numpy(), 2 * x.numpy() + 3)
    a, b = x * 2, x**2
    (g,) = tm.grad([a, b], [x], grad_outputs=[tm.ones(2, dtype=tm.float64), np.array([1.0, 2.0])])
    np.testing.assert_array_equal(g.numpy(), 2 + 2 * x.numpy() * [1.0, 2.0])


def test_grad_returns_a_tuple_even_for_one_input():
    x = f64(1.0)
    result = tm.grad(x * 2, x)
    assert isinstance(result, tuple) and len(result) == 1


def test_grad_does_not_touch_dot_grad():
    x = f64([1.0, 2.0])
    x.grad = tm.tensor([7.0, 7.0], dtype=tm.float64)
    tm.grad((x * x).sum(), x)
    np.testing.assert_array_equal(x.grad.numpy(), [7.0, 7.0])
    y = f64([1.0])
    tm.grad((y * y).sum(), y)
    assert y.grad is None


def test_grad_wrt_the_output_itself():
    x = f64([1.0, 2.0])
    y = (x * x).sum()
    (g,) = tm.grad(y, y)
    assert g.item() == 1.0


def test_backward_from_a_leaf():
    x = f64(3.0)
    x.backward()
    assert x.grad.item() == 1.0


# --- detach and requires_grad_ --------------------------------------------------------------------


def test_detach_shares_data_and_cuts_the_graph():
    x = f64([1.0, 2.0])
    h = x * 2
    d = h.detach()
    assert d.grad_fn is None and not d.requires_grad and d.is_leaf
    assert np.shares_memory(d.data, h.data)
    y = (h * d).sum()  # only the h factor carries gradient
    y.backward()
    np.testing.assert_array_equal(x.grad.numpy(), 2 * d.numpy())


def test_requires_grad_():
    x = tm.tensor([1.0, 2.0])
    assert not x.requires_grad
    assert x.requires_grad_() is x and x.requires_grad
    x.requires_grad_(False)
    assert not x.requires_grad
    with pytest.raises(TypeError, match="only floating-point tensors can require gradients"):
        tm.tensor([1, 2]).requires_grad_()
    h = f64([1.0]) * 2
    with pytest.raises(RuntimeError, match="non-leaf"):
        h.requires_grad_(False)
    assert h.requires_grad


def test_ops_on_tensors_not_requiring_grad_record_nothing():
    x = tm.tensor([1.0, 2.0])
    y = (x * 2).exp()
    assert y.grad_fn is None and not y.requires_grad


def test_comparisons_are_bool_and_not_differentiable():
    x = f64([1.0, 2.0, 3.0])
    for mask, expected in (
        (x < 2, [True, False, False]),
        (x <= 2, [True, True, False]),
        (x > 2, [False, False, True]),
        (x >= 2, [False, True, True]),
        (x == 2, [False, True, False]),
        (x != 2, [True, False, True]),
    ):
        assert mask.dtype == tm.bool_ and not mask.requires_grad and mask.grad_fn is None
        np.testing.assert_array_equal(mask.numpy(), expected)


def test_tensors_hash_by_identity():
    a, b = tm.tensor([1.0]), tm.tensor([1.0])
    assert len({a, b}) == 2 and {a: 1}[a] == 1


# --- dtype rules (API.md) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, dtype",
    [
        ([1.0, 2.0], tm.float32),
        (1.5, tm.float32),
        ([[1.0], [2.0]], tm.float32),
        ([1, 2], tm.int64),
        (3, tm.int64),
        ([True, False], tm.bool_),
        (np.array([1.0, 2.0]), tm.float64),
        (np.array([1.0], dtype=np.float32), tm.float32),
        (np.array([1, 2], dtype=np.int32), np.dtype(np.int32)),
        (np.float64(1.0), tm.float64),
    ],
)
def test_tensor_dtype_rules(data, dtype):
    assert tm.tensor(data).dtype == dtype


@pytest.mark.parametrize("dtype", [tm.float32, tm.float64])
def test_python_scalars_take_the_tensors_dtype(dtype):
    x = tm.tensor([1.0, 2.0], dtype=dtype)
    for y in (x + 1, 2 * x, x - 0.5, 1.5 / x, x**2, x**0.5, 2.0**x, -x, x * True, x.clip(0, 1)):
        assert y.dtype == dtype


def test_integer_tensor_with_integer_scalar_stays_integer():
    x = tm.tensor([1, 2])
    assert (x + 1).dtype == tm.int64 and (x * 3).dtype == tm.int64


def test_numpy_arrays_keep_their_dtype_in_ops():
    x = tm.tensor([1.0, 2.0])  # float32
    assert (x + np.array([1.0, 2.0], dtype=np.float32)).dtype == tm.float32
    assert (x + np.array([1.0, 2.0])).dtype == tm.float64
    assert (np.array([1.0, 2.0]) * x).dtype == tm.float64  # ndarray on the left defers to Tensor


@pytest.mark.parametrize("dtype", [tm.float32, tm.float64])
def test_graph_stays_in_its_dtype(dtype):
    x = tm.tensor([0.5, 1.5], dtype=dtype, requires_grad=True)
    w = tm.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype, requires_grad=True)
    y = ((x @ w).tanh() * 2.0 + 1).logsumexp() / 3.0
    assert y.dtype == dtype
    gx, gw = tm.grad(y, [x, w], create_graph=True)
    assert gx.dtype == dtype and gw.dtype == dtype
    (ggx,) = tm.grad(gx.sum() + gw.sum(), x)
    assert ggx.dtype == dtype
    y2 = ((x @ w).tanh() * 2.0 + 1).logsumexp() / 3.0
    y2.backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype


def test_mixed_float32_float64_promotes_but_grads_keep_each_dtype():
    a = tm.tensor([1.0, 2.0], dtype=tm.float32, requires_grad=True)
    b = tm.tensor([3.0, 4.0], dtype=tm.float64, requires_grad=True)
    y = a * b
    assert y.dtype == tm.float64
    ga, gb = tm.grad(y.sum(), [a, b], create_graph=True)
    assert ga.dtype == tm.float32 and gb.dtype == tm.float64
    np.testing.assert_array_equal(ga.numpy(), [3.0, 4.0])
    (gga,) = tm.grad((ga * ga).sum(), b)  # second order through the cast
    assert gga.dtype == tm.float64
    np.testing.assert_array_equal(gga.numpy(), [6.0, 8.0])
    (a @ b).backward()
    assert a.grad.dtype == tm.float32 and b.grad.dtype == tm.float64


def test_astype_is_differentiable_and_casts_the_gradient_back():
    x = tm.tensor([1.0, 2.0], requires_grad=True)  # float32
    y = x.astype(tm.float64)
    assert y.dtype == tm.float64 and y.grad_fn is not None
    (y * y).sum().backward()
    assert x.grad.dtype == tm.float32
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0])
    assert x.astype(tm.float32) is x  # no-op cast
    i = x.astype(tm.int64)
    assert i.dtype == tm.int64 and not i.requires_grad


# --- 0-d tensors ----------------------------------------------------------------------------


def test_0d_results_are_arrays_not_numpy_scalars():
    # NumPy returns scalars (np.float64, np.bool_) from 0-d arithmetic; a tensor must hold
    # an array, or .numpy() and the backends break.
    x = f64(2.0)
    for t in (x > 1.0, x == 2.0, x * 3, x.max(), tm.Tensor(np.float64(1.0)), x.detach() + 1):
        assert isinstance(t.data, np.ndarray) and t.data.ndim == 0
        assert isinstance(t.numpy(), np.ndarray)
    (x * x).backward()
    (x * x).backward()  # accumulation of two 0-d gradients
    assert isinstance(x.grad.data, np.ndarray) and x.grad.numpy() == 8.0


class _SplitScaled(Function):
    """(a, b) = (2x, 3x): a two-output op; gx = 2 ga + 3 gb."""

    saves_inputs = False

    def forward(self, x):
        return 2.0 * x, 3.0 * x

    def backward(self, ga, gb):
        return ga * 2.0 + gb * 3.0


def test_multi_output_node_whose_unused_output_is_gone():
    """Backward through one output of a two-output node whose other output was garbage
    collected: the missing gradient is zero, built without the freed output."""
    x = tm.tensor([1.0, -2.0, 0.5], dtype=tm.float64, requires_grad=True)
    a, b = _SplitScaled.apply(x)
    ref = weakref.ref(b)
    del b
    gc.collect()
    assert ref() is None  # nothing else kept it alive
    (g,) = tm.grad((a * a).sum(), x, create_graph=True)
    np.testing.assert_allclose(g.numpy(), 8.0 * x.numpy())  # d/dx sum (2x)^2 = 8x
    (gg,) = tm.grad(g.sum(), x)
    np.testing.assert_allclose(gg.numpy(), np.full(3, 8.0))


def test_sum_gradient_reaches_the_leaf_as_writable_memory():
    # Sum's backward hands an unrecorded gradient back as a broadcast view (no node); the
    # leaf's .grad must still be memory of its own that an optimizer can update in place.
    x = tm.tensor(np.zeros((3, 4), dtype=np.float32), requires_grad=True)
    x.sum().backward()
    assert x.grad.data.flags.writeable and 0 not in x.grad.data.strides
    x.grad.data += 1.0
    np.testing.assert_array_equal(x.grad.numpy(), np.full((3, 4), 2.0, np.float32))
    (g,) = tm.grad(x.sum(axis=1), x, grad_outputs=tm.tensor(np.arange(3, dtype=np.float32)))
    np.testing.assert_array_equal(g.numpy(), np.repeat(np.arange(3.0), 4).reshape(3, 4))


def test_gradient_sums_agree_with_and_without_a_graph():
    # A tensor used three times gets three gradients; without create_graph they are added
    # as arrays, with it through Add nodes. Same values, same dtype; only one is a graph.
    a = np.array([0.3, -1.2, 2.0], dtype=np.float32)
    x = tm.tensor(a, requires_grad=True)

    def f():
        return (x * 2.0 + x * x + tm.tanh(x)).sum()

    (plain,) = tm.grad(f(), x)
    (graphed,) = tm.grad(f(), x, create_graph=True)
    expected = 2.0 + 2.0 * a + (1.0 - np.tanh(a) ** 2)
    for g in (plain, graphed):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g.numpy(), expected, rtol=1e-6)
    assert plain.grad_fn is None and graphed.grad_fn is not None
