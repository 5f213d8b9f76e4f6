"""The fused gradients of ``linear``: LinearGradInput and LinearGradWeight.

Linear's backward is two ops whose own backward rules are Linear and these two
again. Checked here: their values against NumPy (einsum) references, the
derivatives of ``F.linear`` of order 1, 2 and 3 against finite differences in
float64 for shared 2-D weights, per-task (batched) weights and broadcast
inputs, the derivatives of the two ops themselves, needs_input_grad (no node
for a gradient nobody asked for), the size of the double-backward graph, and a
clear error for shapes that do not line up.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta.autograd.graph import functions
from tinymeta.nn.functional import LinearGradInput, LinearGradWeight
from tinymeta.testing import check_grads, gradcheck, gradgradcheck

# (x shape, w shape): shared 2-D weights, per-task weights, broadcast inputs.
CASES = {
    "2d-weight, 1-d x": ((3,), (2, 3)),
    "2d-weight, (N, in)": ((4, 3), (2, 3)),
    "2d-weight, (T, N, in)": ((2, 4, 3), (5, 3)),
    "batched weight": ((3, 4, 2), (3, 5, 2)),
    "batched weight, x shared by tasks": ((4, 2), (3, 5, 2)),
    "batched weight, x broadcast over tasks": ((1, 4, 2), (3, 5, 2)),
    "x with an extra batch axis": ((2, 3, 4, 2), (3, 1, 2)),
    "in_features 1 (the sinusoid's first layer)": ((3, 4, 1), (3, 6, 1)),
}


def inputs(x_shape, w_shape, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    x = tm.tensor(rng.standard_normal(x_shape), requires_grad=True)
    w = tm.tensor(rng.standard_normal(w_shape), requires_grad=True)
    b = tm.tensor(rng.standard_normal(w_shape[:-1]), requires_grad=True) if bias else None
    return x, w, b


def reference_grads(x, w, gy):
    """NumPy gx, gw, gb of y = x @ w^T + b for the output gradient gy (all arrays)."""
    x2 = x[None] if x.ndim == 1 else x  # a 1-D x is one row
    gy2 = gy[None] if gy.ndim == 1 else gy
    gx = np.einsum("...no,...oi->...ni", gy2, np.broadcast_to(w, gy2.shape[:-2] + w.shape[-2:]))
    gw = np.einsum("...no,...ni->...oi", gy2, np.broadcast_to(x2, gy2.shape[:-1] + x.shape[-1:]))
    gb = gy2.sum(axis=-2)
    lead = gw.ndim - w.ndim  # sum the axes w does not have, then those it broadcast
    gw, gb = gw.sum(axis=tuple(range(lead))), gb.sum(axis=tuple(range(lead)))
    if w.ndim > 2:
        axes = tuple(i for i, n in enumerate(w.shape[:-2]) if n == 1)
        gw, gb = gw.sum(axis=axes, keepdims=True), gb.sum(axis=axes, keepdims=True)
    gx = gx.reshape(-1, x.shape[-1]).sum(0) if x.ndim == 1 else _sum_to(gx, x.shape)
    return gx, gw, gb


def _sum_to(a, shape):
    lead = a.ndim - len(shape)
    a = a.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return a.sum(axis=axes, keepdims=True)


@pytest.mark.parametrize("x_shape, w_shape", CASES.values(), ids=CASES.keys())
def test_gradients_match_numpy(x_shape, w_shape):
    x, w, b = inputs(x_shape, w_shape)
    y = F.linear(x, w, b)
    gy = np.random.default_rng(1).standard_normal(y.shape)
    gx, gw, gb = tm.grad(y, [x, w, b], grad_outputs=tm.tensor(gy))
    rx, rw, rb = reference_grads(x.numpy(), w.numpy(), gy)
    np.testing.assert_allclose(gx.numpy(), rx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gw.numpy(), rw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gb.numpy(), rb, rtol=1e-12, atol=1e-12)
    assert gx.grad_fn is None and gw.grad_fn is None  # create_graph=False records nothing


@pytest.mark.parametrize("x_shape, w_shape", CASES.values(), ids=CASES.keys())
def test_linear_gradcheck_and_gradgradcheck(x_shape, w_shape):
    x, w, b = inputs(x_shape, w_shape)
    assert gradcheck(F.linear, [x, w, b], full=True)
    assert gradgradcheck(F.linear, [x, w, b], full=True)
    assert gradgradcheck(lambda x, w: F.linear(x, w), [x, w])


@pytest.mark.parametrize("x_shape, w_shape", CASES.values(), ids=CASES.keys())
def test_linear_third_order_directional(x_shape, w_shape):
    """Order 3: the meta-gradient of a second-order inner loop differentiates this far."""
    x, w, b = inputs(x_shape, w_shape, seed=2)
    assert check_grads(F.linear, [x, w, b], order=3)


@pytest.mark.parametrize("x_shape, w_shape", CASES.values(), ids=CASES.keys())
def test_the_fused_ops_have_exact_derivatives_up_to_order_3(x_shape, w_shape):
    x, w, _ = inputs(x_shape, w_shape, seed=3)
    gy = tm.tensor(np.random.default_rng(4).standard_normal(F.linear(x, w).shape))

    def grad_input(gy, w):
        return LinearGradInput.apply(gy, w, x_shape=x_shape)

    def grad_weight(x, gy):
        return LinearGradWeight.apply(x, gy, w_shape=w_shape, with_bias=True)

    assert check_grads(grad_input, [gy, w], order=3)
    assert check_grads(grad_weight, [x, gy], order=3)


def test_third_derivative_of_a_cubic_in_the_weight_by_hand():
    """f(w) = sum((x w^T)^3): f''' along a direction u is 6 sum((x u^T)^3), exactly."""
    rng = np.random.default_rng(5)
    x = tm.tensor(rng.standard_normal((3, 4, 2)))
    w = tm.tensor(rng.standard_normal((3, 5, 2)), requires_grad=True)
    u = tm.tensor(rng.standard_normal((3, 5, 2)))
    f = (F.linear(x, w) ** 3).sum()
    (g,) = tm.grad(f, w, create_graph=True)
    (h,) = tm.grad((g * u).sum(), w, create_graph=True)
    (t,) = tm.grad((h * u).sum(), w)
    expected = 6.0 * np.sum((x.numpy() @ np.swapaxes(u.numpy(), -1, -2)) ** 3)
    np.testing.assert_allclose((t * u).sum().item(), expected, rtol=1e-10)


def test_only_the_requested_gradients_make_nodes():
    x, w, b = inputs((3, 4, 2), (3, 5, 2))
    x.requires_grad_(False)
    (gw,) = tm.grad((F.linear(x, w, b) ** 2).sum(), [w], create_graph=True)
    assert gw.grad_fn.op_name() == "LinearGradWeight"
    # x needs no gradient: LinearGradInput is never applied.
    ops = {fn.op_name() for fn in functions([gw])}
    assert "LinearGradInput" not in ops


def test_a_layers_double_backward_is_a_handful_of_nodes():
    """grad of a layer is 2 nodes; the gradient of that gradient adds at most 4 more."""
    x, w, b = inputs((3, 4, 2), (3, 5, 2))
    loss = (F.linear(x, w, b) ** 2).sum()
    gx, gw, gb = tm.grad(loss, [x, w, b], create_graph=True)
    first = [fn.op_name() for fn in functions([gx, gw, gb])]
    assert first.count("LinearGradInput") == 1 and first.count("LinearGradWeight") == 1
    assert "MatMul" not in first and "Transpose" not in first
    with tm.autograd.trace() as tr:
        tm.grad((gx * gx).sum() + (gw * gw).sum() + (gb * gb).sum(), [x, w, b])
    rules = tr.count_by_op()
    assert rules["LinearGradInput"] == 1 and rules["LinearGradWeight"] == 1
    assert "MatMul" not in rules and "Transpose" not in rules and "Reshape" not in rules


@st.composite
def linear_shapes(draw):
    """x and w shapes for linear: shared or per-task weights, x broadcast against them."""
    n_in, n_out, n = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["shared", "batched", "batched-broadcast-x", "1-d x"]))
    if kind == "1-d x":
        return (n_in,), (n_out, n_in)
    if kind == "shared":
        lead = draw(st.lists(st.integers(1, 3), max_size=2))
        return (*lead, n, n_in), (n_out, n_in)
    tasks = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    x_lead = tasks if kind == "batched" else [draw(st.sampled_from([1, t])) for t in tasks]
    x_lead = x_lead[draw(st.integers(0, len(x_lead))) :]  # x may lack leading task axes
    return (*x_lead, n, n_in), (*tasks, n_out, n_in)


@settings(max_examples=15, deadline=None)
@given(shapes=linear_shapes(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_grads_order_2_hypothesis(shapes, bias, seed):
    x_shape, w_shape = shapes
    x, w, b = inputs(x_shape, w_shape, seed, bias)
    args = [x, w, b] if bias else [x, w]
    assert check_grads(F.linear, args, order=2)


def test_float32_gradients_stay_float32_and_agree_with_float64():
    x, w, b = inputs((3, 4, 2), (3, 5, 2))
    x32, w32, b32 = (tm.tensor(t.numpy().astype(np.float32), requires_grad=True) for t in (x, w, b))
    g64 = tm.grad((F.linear(x, w, b) ** 2).sum(), [x, w, b], create_graph=True)
    g32 = tm.grad((F.linear(x32, w32, b32) ** 2).sum(), [x32, w32, b32], create_graph=True)
    for a, c in zip(g64, g32):
        assert c.dtype == np.float32
        np.testing.assert_allclose(c.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)


def test_shapes_that_do_not_line_up_name_the_op():
    gy = tm.tensor(np.ones((4, 5)))
    w = tm.tensor(np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"LinearGradInput: .*\(4, 5\).*\(3, 2\)"):
        LinearGradInput.apply(gy, w, x_shape=(4, 2))


def test_an_inner_size_of_1_still_checks_the_shapes():
    """The outer-product fast path must not turn a mismatch into a broadcast."""
    gy = tm.tensor(np.ones((2, 1)))
    w = tm.tensor(np.ones((2, 4)))  # gy @ w needs w with 1 row
    with pytest.raises(ValueError, match=r"LinearGradInput: .*\(2, 1\).*\(2, 4\)"):
        LinearGradInput.apply(gy, w, x_shape=(2, 4))
