"""The fused training-mode batch norm (tinymeta.nn.batchnorm) behind F.batch_norm.

Against the composed formula it replaced (values, first and second derivatives), the fused
double backward (one kernel call with grad mode off) against its composed-op rule, against
finite differences (gradcheck and gradgradcheck in float64, the third order by directional
checks), for (N, C), (N, C, H, W) and (T, N, C, H, W) inputs with and without weight and bias,
shared or per-task parameters; running statistics; the NumPy-reference kernels give the same
results as the Numba ones."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta import kernels
from tinymeta.ops.reductions import mean as tm_mean
from tinymeta.testing import check_grads

# --- the composed formula (the previous implementation), as the reference ------------------


def composed_batch_norm(x, weight, bias, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, from differentiable ops."""
    if x.ndim == 5:
        axes, stat = (1, 3, 4), lambda p: p.reshape((-1, 1, p.shape[-1], 1, 1))
    else:
        axes = (0,) if x.ndim == 2 else (0, 2, 3)
        stat = lambda p: p.reshape((1, -1) + (1,) * (x.ndim - 2))  # noqa: E731
    mu = tm_mean(x, axes, keepdims=True)
    centred = x - mu
    var = tm_mean(centred * centred, axes, keepdims=True)
    y = centred * (var + eps) ** -0.5
    if weight is not None:
        y = y * stat(weight)
    return y if bias is None else y + stat(bias)


def fused(x, weight, bias, eps=1e-5):
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


# --- cases -------------------------------------------------------------------------------


@st.composite
def bn_cases(draw, max_side: int = 3):
    """(x, weight, bias) float64 arrays: 2-D, 4-D or 5-D x; weight/bias None, (C,) or (T, C)."""
    rank = draw(st.sampled_from([2, 4, 5]))
    c = draw(st.integers(1, 3))
    n = draw(st.integers(2, 4))
    spatial = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    t = draw(st.integers(1, 3))
    shape = {2: (n, c), 4: (n, c) + spatial, 5: (t, n, c) + spatial}[rank]
    affine = draw(st.sampled_from(["none", "weight", "both"]))
    per_task = rank == 5 and draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal(shape) * rng.uniform(0.5, 2) + rng.uniform(-1, 1)
    p_shape = (t, c) if per_task else (c,)
    weight = rng.standard_normal(p_shape) if affine != "none" else None
    bias = rng.standard_normal(p_shape) if affine == "both" else None
    return x, weight, bias


def _leaves(*arrays):
    return [None if a is None else tm.tensor(a, requires_grad=True) for a in arrays]


def _grads(fn, inputs, create_graph=False):
    live = [t for t in inputs if t is not None]
    y = fn(*inputs)
    v = tm.tensor(np.random.default_rng(7).standard_normal(y.shape))
    return y, tm.grad((y * v).sum(), live, create_graph=create_graph)


# --- values and derivatives against the composed formula ------------------------------------


@given(case=bn_cases())
def test_fused_matches_composed_values_and_first_and_second_derivatives(case):
    inputs = _leaves(*case)
    y, gs = _grads(fused, inputs, create_graph=True)
    y_ref, gs_ref = _grads(composed_batch_norm, inputs, create_graph=True)
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), rtol=1e-10, atol=1e-12)
    for g, g_ref in zip(gs, gs_ref):
        np.testing.assert_allclose(g.numpy(), g_ref.numpy(), rtol=1e-8, atol=1e-10)
    # Second order: the gradient of <u, first gradients> with respect to every input.
    live = [t for t in inputs if t is not None]
    rng = np.random.default_rng(8)
    us = [tm.tensor(rng.standard_normal(g.shape)) for g in gs]
    second = tm.grad(sum((g * u).sum() for g, u in zip(gs, us)), live, allow_unused=True)
    second_ref = tm.grad(sum((g * u).sum() for g, u in zip(gs_ref, us)), live, allow_unused=True)
    for s, s_ref in zip(second, second_ref):
        if s_ref is None:  # e.g. the bias: the gradients do not depend on it
            assert s is None or np.allclose(s.numpy(), 0)
        else:
            np.testing.assert_allclose(s.numpy(), s_ref.numpy(), rtol=1e-7, atol=1e-9)


def _second_derivatives(inputs, create_graph: bool):
    """The gradients of <u, first gradients of sum(v * y**2)> w.r.t. the inputs. gy = 2 v y
    depends on every input, so the double backward needs all of ggy, gx' and gw'.
    With create_graph=False the batch-norm double backward is one kernel call; with True it
    is recorded from differentiable ops: the two must agree."""
    live = [t for t in inputs if t is not None]
    rng = np.random.default_rng(13)
    y = fused(*inputs)
    v = tm.tensor(rng.standard_normal(y.shape))
    gs = tm.grad((v * y * y).sum(), live, create_graph=True)
    us = [tm.tensor(rng.standard_normal(g.shape)) for g in gs]
    total = sum((g * u).sum() for g, u in zip(gs, us))
    return tm.grad(total, live, create_graph=create_graph, allow_unused=True)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@given(case=bn_cases())
def test_fused_double_backward_matches_the_composed_rule(backend, case):
    previous = kernels.set_backend(backend)
    try:
        inputs = _leaves(*case)
        fused_kernel = _second_derivatives(inputs, create_graph=False)
        composed_ops = _second_derivatives(inputs, create_graph=True)
    finally:
        kernels.set_backend(previous)
    for g, g_ref in zip(fused_kernel, composed_ops):
        assert (g is None) == (g_ref is None)
        if g is not None:
            assert not g.requires_grad  # the kernel's results are constants
            np.testing.assert_allclose(g.numpy(), g_ref.numpy(), rtol=1e-8, atol=1e-10)


def test_fused_double_backward_in_float32_matches_float64():
    rng = np.random.default_rng(14)
    case = (rng.standard_normal((3, 4, 5, 3, 3)) + 2, rng.standard_normal((3, 5)), np.ones(5))
    want = _second_derivatives(_leaves(*case), create_graph=False)
    got = _second_derivatives(_leaves(*(a.astype(np.float32) for a in case)), create_graph=False)
    for g, g_ref in zip(got, want):
        assert g.dtype == np.float32
        scale = np.abs(g_ref.numpy()).max()
        np.testing.assert_allclose(g.numpy(), g_ref.numpy(), rtol=1e-3, atol=1e-4 * scale)


@given(case=bn_cases(max_side=2))
def test_fused_gradcheck_and_gradgradcheck(case):
    x, weight, bias = case
    args = [a for a in (x, weight, bias) if a is not None]

    def fn(*ts):
        it = iter(ts[1:])
        w = next(it) if weight is not None else None
        b = next(it) if bias is not None else None
        return fused(ts[0], w, b)

    check_grads(fn, args, order=2)


@pytest.mark.parametrize(
    "shape, p_shape",
    [((4, 3), (3,)), ((3, 2, 2, 3), (2,)), ((2, 3, 2, 2, 2), (2, 2)), ((2, 3, 2, 2, 2), (2,))],
)
def test_third_order_by_directional_checks(shape, p_shape):
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal(shape), rng.standard_normal(p_shape), rng.standard_normal(p_shape)
    check_grads(fused, [x, w, b], order=3)
    check_grads(lambda x: fused(x, None, None), [x], order=3)


def test_gradient_of_one_parameter_then_differentiated_again():
    # Only the weight's gradient is kept (as when adapting a subset of the parameters): the
    # other gradient nodes of the backward may be freed, and the graph must still work.
    rng = np.random.default_rng(4)
    x, w, b = _leaves(rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(2), np.zeros(2))
    x_ref, w_ref, b_ref = _leaves(x.numpy(), w.numpy(), b.numpy())
    (gw,) = tm.grad((fused(x, w, b) ** 3).sum(), [w], create_graph=True)
    (gw_ref,) = tm.grad(
        (composed_batch_norm(x_ref, w_ref, b_ref) ** 3).sum(), [w_ref], create_graph=True
    )
    hx, hw = tm.grad((gw * gw).sum(), [x, w])
    hx_ref, hw_ref = tm.grad((gw_ref * gw_ref).sum(), [x_ref, w_ref])
    np.testing.assert_allclose(hx.numpy(), hx_ref.numpy(), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(hw.numpy(), hw_ref.numpy(), rtol=1e-8, atol=1e-10)


# --- layouts, dtypes and the NumPy kernels ---------------------------------------------------


def test_channels_last_and_float32_inputs():
    rng = np.random.default_rng(5)
    nhwc = rng.standard_normal((6, 5, 5, 4)).astype(np.float32)
    x = tm.tensor(nhwc).transpose(0, 3, 1, 2)  # NCHW view of channels-last memory
    assert not x.data.flags.c_contiguous
    w, b = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    y = fused(x, tm.tensor(w), tm.tensor(b))
    assert y.dtype == np.float32
    ref = composed_batch_norm(tm.tensor(x.numpy().astype(np.float64)), tm.tensor(w), tm.tensor(b))
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)


@given(case=bn_cases())
def test_numpy_kernels_give_the_same_values_and_gradients(case):
    inputs = _leaves(*case)
    y, gs = _grads(fused, inputs)
    previous = kernels.set_backend("numpy")
    try:
        y_np, gs_np = _grads(fused, inputs)
    finally:
        kernels.set_backend(previous)
    np.testing.assert_allclose(y.numpy(), y_np.numpy(), rtol=1e-12, atol=1e-12)
    for g, g_np in zip(gs, gs_np):
        np.testing.assert_allclose(g.numpy(), g_np.numpy(), rtol=1e-10, atol=1e-12)


# --- running statistics and evaluation ----------------------------------------------------


def test_running_statistics_with_a_task_axis_average_the_per_task_statistics():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 2, 2, 3)) + np.arange(3)[:, None, None, None, None]
    rm, rv = tm.zeros(2, dtype=tm.float64), tm.ones(2, dtype=tm.float64)
    F.batch_norm(tm.tensor(x), rm, rv, training=True, momentum=0.25)
    count = 4 * 2 * 3
    mean = x.mean(axis=(1, 3, 4)).mean(axis=0)
    var = (x.var(axis=(1, 3, 4)) * count / (count - 1)).mean(axis=0)
    np.testing.assert_allclose(rm.numpy(), 0.25 * mean, rtol=1e-12)
    np.testing.assert_allclose(rv.numpy(), 0.75 + 0.25 * var, rtol=1e-12)
    assert rm._version == 1 and rm.grad_fn is None


def test_running_statistics_for_nchw_input_match_numpy():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((5, 3, 2, 4)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    F.batch_norm(tm.tensor(x), rm, rv, training=True, momentum=0.5)
    np.testing.assert_allclose(rm, 0.5 * x.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rv, 0.5 + 0.5 * x.var(axis=(0, 2, 3), ddof=1), rtol=1e-5)


def test_eval_with_a_task_axis_and_per_task_weights():
    rng = np.random.default_rng(10)
    x, w = rng.standard_normal((2, 3, 4, 2, 2)), rng.standard_normal((2, 4))
    rm, rv = rng.standard_normal(4), rng.random(4) + 0.5
    y = F.batch_norm(tm.tensor(x), rm, rv, tm.tensor(w), None, training=False)
    want = (x - rm[:, None, None]) / np.sqrt(rv[:, None, None] + 1e-5) * w[:, None, :, None, None]
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-12)


def test_per_task_statistics_equal_separate_calls():
    rng = np.random.default_rng(11)
    x, w, b = rng.standard_normal((3, 4, 2, 3, 3)), rng.standard_normal((3, 2)), np.zeros(2)
    y = fused(tm.tensor(x), tm.tensor(w), tm.tensor(b)).numpy()
    for t in range(3):
        y_t = fused(tm.tensor(x[t]), tm.tensor(w[t]), tm.tensor(b)).numpy()
        np.testing.assert_allclose(y[t], y_t, rtol=1e-12, atol=1e-12)


# --- errors ------------------------------------------------------------------------------


def test_errors_name_the_op_and_the_shapes():
    x5 = tm.zeros(2, 3, 4, 2, 2)
    with pytest.raises(ValueError, match=r"batch_norm: weight must have shape \(4,\) or \(2, 4\)"):
        F.batch_norm(x5, None, None, tm.ones(3, 4), training=True)
    with pytest.raises(ValueError, match=r"batch_norm: bias must have shape \(3,\) .*\(2, 3\)"):
        F.batch_norm(tm.zeros(4, 3, 2, 2), None, None, None, tm.zeros(2, 3), training=True)
    with pytest.raises(ValueError, match=r"batch_norm: running_var must have shape \(4,\)"):
        F.batch_norm(x5, tm.zeros(4), tm.ones(2, 4), training=True)
    with pytest.raises(ValueError, match=r"\(T, N, C, H, W\) with a leading task axis"):
        F.batch_norm(tm.zeros(2, 3, 4), None, None, training=True)
    with pytest.raises(TypeError, match="batch_norm: expected a float32 or float64 input"):
        F.batch_norm(tm.tensor(np.zeros((4, 3), np.int64)), None, None, training=True)
    with pytest.raises(ValueError, match="training needs more than one value per channel"):
        F.batch_norm(tm.zeros(2, 1, 3, 1, 1), None, None, training=True)
