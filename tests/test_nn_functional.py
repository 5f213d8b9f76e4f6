"""tinymeta.nn.functional: forward values against plain NumPy references (naive
loops), and derivatives of order 1-2 (order 3 for what MAML differentiates
twice: linear, relu, softmax, log_softmax, cross_entropy, mse) over
Hypothesis-drawn shapes, strides and paddings.

Tests that take ``device`` run on cpu and, where a GPU is available, on cuda
(see conftest.py); constants such as labels and running statistics stay NumPy
arrays and must follow the data to the GPU."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta.testing import check_grads
from tinymeta.testing import strategies as tms

# --- NumPy references: the definitions, written as loops ------------------------------------


def conv2d_ref(x, w, b, stride, padding):
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    xp[:, :, ph : ph + h, pw : pw + wd] = x
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    y = np.zeros((n, o, oh, ow))
    for i in range(oh):
        for j in range(ow):
            window = xp[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]  # (n, c, kh, kw)
            y[:, :, i, j] = np.einsum("ncpq,ocpq->no", window, w)
    return y if b is None else y + b[None, :, None, None]


def max_pool2d_ref(x, kernel, stride):
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    y = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            y[:, :, i, j] = x[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw].max(axis=(2, 3))
    return y


def batch_norm_ref(x, weight, bias, eps):
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu, var = x.mean(axis=axes), x.var(axis=axes)
    y = (x - mu.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return y * weight.reshape(shape) + bias.reshape(shape), mu, var


def log_softmax_ref(x, axis):
    out = np.empty_like(x)
    moved, res = np.moveaxis(x, axis, -1), np.moveaxis(out, axis, -1)
    for idx in np.ndindex(moved.shape[:-1]):
        row = moved[idx]
        res[idx] = row - np.log(np.sum(np.exp(row - row.max()))) - row.max()
    return out


# --- strategies ------------------------------------------------------------------------------

pairs = st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 2), st.integers(1, 2)))


@st.composite
def conv_cases(draw):
    """(x shape, w shape, stride, padding) with N, C, O <= 2 and H, W <= 6."""
    n, c, o = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = draw(pairs)
    padding = draw(st.one_of(st.integers(0, 1), st.tuples(st.integers(0, 1), st.integers(0, 1))))
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    h = draw(st.integers(max(1, kh - 2 * ph), 6))
    w = draw(st.integers(max(1, kw - 2 * pw), 6))
    return (n, c, h, w), (o, c, kh, kw), stride, padding


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _rng(seed):
    return np.random.default_rng(seed)


def _on(device, *arrays) -> list:
    """Tensors holding ``arrays`` on ``device`` (what check_grads gets for that device)."""
    return [tm.tensor(a, device=device) for a in arrays]


seeds = st.integers(0, 2**32 - 1)


# --- linear ---------------------------------------------------------------------------------


@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    fan_in=st.integers(1, 4),
    fan_out=st.integers(1, 3),
    bias=st.booleans(),
    seed=seeds,
)
def test_linear_matches_numpy_and_grads_order_3(lead, fan_in, fan_out, bias, seed, device):
    rng = _rng(seed)
    x = rng.standard_normal((*lead, fan_in))
    w = rng.standard_normal((fan_out, fan_in))
    b = rng.standard_normal(fan_out) if bias else None
    y = F.linear(*_on(device, x, w), None if b is None else tm.tensor(b, device=device))
    assert y.device == device
    np.testing.assert_allclose(y.numpy(), x @ w.T + (0 if b is None else b), rtol=1e-12)
    if bias:
        check_grads(lambda x, w, b: F.linear(x, w, b), _on(device, x, w, b), order=3)
    else:
        check_grads(lambda x, w: F.linear(x, w), _on(device, x, w), order=3)


@given(
    batch=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    shared_x=st.booleans(),
    n=st.integers(1, 3),
    seed=seeds,
)
def test_linear_with_batched_weights_applies_each_batch_elements_own(
    batch, shared_x, n, seed, device
):
    # Per-task weights (B..., out, in): what task-vectorized MAML feeds through functional_call.
    rng = _rng(seed)
    w, b = rng.standard_normal((*batch, 3, 2)), rng.standard_normal((*batch, 3))
    x = rng.standard_normal((n, 2) if shared_x else (*batch, n, 2))
    y = F.linear(*_on(device, x, w, b)).numpy()
    for k in np.ndindex(*batch):
        xk = x if shared_x else x[k]
        np.testing.assert_allclose(y[k], xk @ w[k].T + b[k], rtol=1e-12)
    check_grads(lambda x, w, b: F.linear(x, w, b), _on(device, x, w, b), order=3)


def test_linear_errors_name_shapes():
    with pytest.raises(ValueError, match=r"linear: input of shape \(2, 3\) has 3 features.*4"):
        F.linear(tm.zeros(2, 3), tm.zeros(5, 4))
    with pytest.raises(ValueError, match="linear: bias must have shape"):
        F.linear(tm.zeros(2, 4), tm.zeros(5, 4), tm.zeros(4))
    with pytest.raises(ValueError, match=r"linear: bias must have shape \(3, 5\)"):
        F.linear(tm.zeros(3, 2, 4), tm.zeros(3, 5, 4), tm.zeros(5))
    with pytest.raises(ValueError, match="linear: batched weights of shape"):
        F.linear(tm.zeros(4), tm.zeros(3, 5, 4))


def test_linear_float32_stays_float32():
    y = F.linear(tm.zeros(2, 3), tm.ones(4, 3), tm.ones(4))
    assert y.dtype == tm.float32 and y.shape == (2, 4)


# --- conv2d ------------------------------------------------------------------------------------


@given(case=conv_cases(), bias=st.booleans(), seed=seeds)
def test_conv2d_matches_naive_loops(case, bias, seed, device):
    xs, ws, stride, padding = case
    rng = _rng(seed)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    b = rng.standard_normal(ws[0]) if bias else None
    tb = None if b is None else tm.tensor(b, device=device)
    y = F.conv2d(*_on(device, x, w), tb, stride, padding)
    ref = conv2d_ref(x, w, b, _pair(stride), _pair(padding))
    assert y.shape == ref.shape
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-10, atol=1e-12)


@given(case=conv_cases(), seed=seeds)
def test_conv2d_grads_order_2(case, seed, device):
    xs, ws, stride, padding = case
    rng = _rng(seed)
    x, w, b = rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[0])
    inputs = _on(device, x, w, b)
    check_grads(lambda x, w, b: F.conv2d(x, w, b, stride, padding), inputs, order=2)


@settings(max_examples=8)
@given(case=conv_cases(), seed=seeds)
def test_conv2d_grads_order_3(case, seed):
    xs, ws, stride, padding = case
    rng = _rng(seed)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    check_grads(lambda x, w: F.conv2d(x, w, None, stride, padding), [x, w], order=3)


def test_conv_relu_pool_loss_derivatives_order_3(device):
    # The MAML shape of the computation: a scalar loss whose gradient is differentiated again.
    rng = _rng(0)
    x, w = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3))

    def loss(x, w):
        h = F.max_pool2d(F.relu(F.conv2d(x, w, padding=1)), 2)
        return (h * h).sum()

    check_grads(loss, _on(device, x, w), order=3)


def test_conv2d_float32_input_keeps_float32_and_layout_is_nchw():
    x = tm.randn(2, 3, 5, 5)
    w = tm.randn(4, 3, 3, 3, requires_grad=True)
    y = F.conv2d(x, w, stride=2, padding=1)
    assert y.shape == (2, 4, 3, 3) and y.dtype == tm.float32
    ref = conv2d_ref(x.numpy().astype(np.float64), w.numpy(), None, (2, 2), (1, 1))
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert w.grad.shape == w.shape and w.grad.dtype == tm.float32


@pytest.mark.parametrize(
    "xs, ws, kwargs, match",
    [
        ((1, 3, 5, 5), (2, 2, 3, 3), {}, r"conv2d: input has 3 channels .* expects 2"),
        ((1, 2, 2, 2), (2, 2, 3, 3), {}, r"conv2d: kernel height 3 exceeds the padded input"),
        ((2, 5, 5), (2, 2, 3, 3), {}, r"conv2d: expected a 4-D input"),
        ((1, 2, 5, 5), (2, 2, 3, 3), {"stride": 0}, r"conv2d: stride must be positive"),
        ((1, 2, 5, 5), (2, 2, 3, 3), {"padding": (1, 2, 3)}, r"conv2d: padding must be"),
        ((1, 2, 5, 5), (2, 2, 3, 3), {"b": np.zeros(3)}, r"conv2d: bias must have shape \(2,\)"),
    ],
)
def test_conv2d_errors_name_op_and_shapes(xs, ws, kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.conv2d(tm.zeros(*xs), tm.zeros(*ws), **kwargs)


# --- max_pool2d -------------------------------------------------------------------------------


@st.composite
def pool_cases(draw):
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kernel = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    stride = draw(st.one_of(st.none(), pairs, st.just(3)))
    kh, kw = _pair(kernel)
    h, w = draw(st.integers(kh, 6)), draw(st.integers(kw, 6))
    return (n, c, h, w), kernel, stride


def _distinct(shape, rng):
    """Values at least 0.1 apart: the arg-max of a window cannot flip under a tiny step."""
    return (rng.permutation(int(np.prod(shape))) * 0.1 - 1.0).reshape(shape)


@given(case=pool_cases(), seed=seeds)
def test_max_pool2d_matches_loops_and_grads_order_2(case, seed, device):
    shape, kernel, stride = case
    x = _distinct(shape, _rng(seed))
    y = F.max_pool2d(tm.tensor(x, device=device), kernel, stride)
    ref = max_pool2d_ref(x, _pair(kernel), _pair(stride if stride is not None else kernel))
    np.testing.assert_array_equal(y.numpy(), ref)
    check_grads(lambda x: F.max_pool2d(x, kernel, stride), _on(device, x), order=2)


@settings(max_examples=8)
@given(case=pool_cases(), seed=seeds)
def test_max_pool2d_grads_order_3(case, seed):
    shape, kernel, stride = case
    x = _distinct(shape, _rng(seed))
    check_grads(lambda x: F.max_pool2d(x, kernel, stride), [x], order=3)


def test_max_pool2d_routes_gradient_to_argmax_and_ties_to_the_first(device):
    x = tm.tensor(
        np.array([[[[1.0, 5.0, 2.0, 2.0], [3.0, 4.0, 2.0, 2.0]]]]),
        device=device,
        requires_grad=True,
    )
    y = F.max_pool2d(x, 2)
    np.testing.assert_array_equal(y.numpy(), [[[[5.0, 2.0]]]])
    y.sum().backward()
    # Window 1: the max 5 gets it all; window 2 is a four-way tie: the first element wins.
    np.testing.assert_array_equal(x.grad.numpy(), [[[[0, 1, 1, 0], [0, 0, 0, 0]]]])


def test_max_pool2d_overlapping_windows_accumulate(device):
    x = tm.tensor(
        np.array([[[[0.0, 9.0, 0.0], [0.0, 0.5, 0.0], [0.1, 0.2, 0.3]]]]),
        device=device,
        requires_grad=True,
    )
    F.max_pool2d(x, 2, stride=1).sum().backward()
    expected = np.zeros((3, 3))
    expected[0, 1] = 2  # the max of both top windows
    expected[1, 1] = 2  # the max of both bottom windows
    np.testing.assert_array_equal(x.grad.numpy()[0, 0], expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_pool_kernel_backends_agree_to_second_order(dtype):
    """The Numba kernels (default) and the NumPy reference (TINYMETA_KERNELS=numpy) give the
    same conv -> relu -> max-pool values, gradients and gradients of gradients."""
    from tinymeta import kernels

    rng = _rng(11)
    x0 = _distinct((2, 3, 7, 6), rng).astype(dtype)
    w0 = rng.standard_normal((4, 3, 3, 3)).astype(dtype)

    def run():
        x, w = tm.tensor(x0, requires_grad=True), tm.tensor(w0, requires_grad=True)
        y = F.max_pool2d(F.relu(F.conv2d(x, w, padding=1)), 2)
        gx, gw = tm.grad((y * y).sum(), [x, w], create_graph=True)
        ggx, ggw = tm.grad((gx * gx).sum() + (gw * gw).sum(), [x, w])
        return [a.numpy() for a in (y, gx, gw, ggx, ggw)]

    previous = kernels.set_backend("numpy")
    try:
        expected = run()
    finally:
        kernels.set_backend(previous)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-10}
    for got, want in zip(run(), expected):
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got, want, **tol)


def test_max_pool2d_errors():
    with pytest.raises(ValueError, match=r"max_pool2d: kernel \(3, 3\) is larger"):
        F.max_pool2d(tm.zeros(1, 1, 2, 2), 3)
    with pytest.raises(ValueError, match="max_pool2d: expected a 4-D input"):
        F.max_pool2d(tm.zeros(1, 4, 4), 2)


# --- batch_norm --------------------------------------------------------------------------------


@st.composite
def bn_cases(draw):
    four_d = draw(st.booleans())
    c = draw(st.integers(1, 2))
    if four_d:
        n, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
        shape = (n, c, h, w)
        if n * h * w < 2:
            shape = (2, c, h, w)
    else:
        shape = (draw(st.integers(2, 4)), c)
    return shape


@given(shape=bn_cases(), seed=seeds, momentum=st.floats(0.05, 0.9))
def test_batch_norm_training_matches_numpy_and_updates_running_stats(shape, seed, momentum, device):
    rng = _rng(seed)
    c = shape[1]
    x, weight, bias = rng.standard_normal(shape), rng.standard_normal(c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.random(c) + 0.5
    rm_t, rv_t = _on(device, rm, rv)  # tensors are updated in place too
    tx, tw, tb = _on(device, x, weight, bias)
    y = F.batch_norm(tx, rm_t, rv_t, tw, tb, True, momentum, 1e-5)
    assert rm_t.device == device
    ref, mu, var = batch_norm_ref(x, weight, bias, 1e-5)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-9, atol=1e-10)
    count = x.size // c
    np.testing.assert_allclose(rm_t.numpy(), (1 - momentum) * rm + momentum * mu)
    unbiased = var * count / (count - 1)
    np.testing.assert_allclose(rv_t.numpy(), (1 - momentum) * rv + momentum * unbiased)


@given(shape=bn_cases(), seed=seeds)
def test_batch_norm_training_grads_order_2(shape, seed, device):
    rng = _rng(seed)
    c = shape[1]
    x, weight, bias = rng.standard_normal(shape), rng.standard_normal(c), rng.standard_normal(c)
    check_grads(
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
        _on(device, x, weight, bias),
        order=2,
    )


@given(shape=bn_cases(), seed=seeds)
def test_batch_norm_eval_uses_running_stats_as_constants(shape, seed, device):
    rng = _rng(seed)
    c = shape[1]
    x, weight, bias = rng.standard_normal(shape), rng.standard_normal(c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.random(c) + 0.5  # host arrays, even for cuda data
    before = (rm.copy(), rv.copy())
    y = F.batch_norm(*_on(device, x), rm, rv, *_on(device, weight, bias), training=False)
    s = (1, c) + (1,) * (x.ndim - 2)
    ref = (x - rm.reshape(s)) / np.sqrt(rv.reshape(s) + 1e-5) * weight.reshape(s) + bias.reshape(s)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-10)
    np.testing.assert_array_equal(rm, before[0])  # eval never touches the running stats
    np.testing.assert_array_equal(rv, before[1])
    check_grads(
        lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=False),
        _on(device, x, weight, bias),
        order=2,
    )


def test_batch_norm_without_affine_and_running_stats_outside_the_graph():
    x = tm.tensor(_rng(1).standard_normal((4, 3, 2, 2)), requires_grad=True)
    rm, rv = tm.zeros(3, dtype=tm.float64), tm.ones(3, dtype=tm.float64)
    y = F.batch_norm(x, rm, rv, training=True)
    np.testing.assert_allclose(y.numpy().mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(y.numpy().var(axis=(0, 2, 3)), 1, rtol=1e-4)
    assert not rm.requires_grad and rm.grad_fn is None and rm._version == 1
    (y * y).sum().backward()  # the running-stat update recorded nothing to differentiate


def test_batch_norm_errors():
    with pytest.raises(ValueError, match=r"batch_norm: training needs more than one value"):
        F.batch_norm(tm.zeros(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match=r"batch_norm: running_mean must have shape \(3,\)"):
        F.batch_norm(tm.zeros(2, 3), tm.zeros(4), tm.ones(3))
    with pytest.raises(ValueError, match="batch_norm: evaluation .* needs running_mean"):
        F.batch_norm(tm.zeros(2, 3), None, None, training=False)
    with pytest.raises(ValueError, match=r"batch_norm: expected an \(N, C\) or \(N, C, H, W\)"):
        F.batch_norm(tm.zeros(2, 3, 4), None, None, training=True)


# --- relu, softmax, log_softmax ------------------------------------------------------------------

small_shapes = tms.shapes(min_dims=1, max_dims=3, max_side=4)


@given(x=tms.arrays(small_shapes, elements=tms.well_conditioned(min_magnitude=0.05)))
def test_relu_forward_and_grads_order_3(x, device):
    np.testing.assert_array_equal(F.relu(tm.tensor(x, device=device)).numpy(), np.maximum(x, 0))
    check_grads(F.relu, _on(device, x), order=3)


def test_relu_derivative_at_zero_is_zero():
    x = tm.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    F.relu(x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 0.0, 1.0])


@given(x=tms.arrays(small_shapes), data=st.data())
def test_softmax_and_log_softmax_match_numpy_and_grads_order_3(x, data, device):
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    ref = log_softmax_ref(x, axis)
    (t,) = _on(device, x)
    np.testing.assert_allclose(F.log_softmax(t, axis).numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(F.softmax(t, axis).numpy(), np.exp(ref), atol=1e-12)
    check_grads(lambda x: F.softmax(x, axis), [t], order=3)
    check_grads(lambda x: F.log_softmax(x, axis), [t], order=3)


def test_softmax_is_stable_for_huge_logits():
    x = tm.tensor([[1000.0, 0.0, -1000.0], [-1e4, -1e4, -1e4]])
    np.testing.assert_allclose(F.softmax(x).numpy(), [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-6)
    np.testing.assert_allclose(F.log_softmax(x).numpy()[0], [0, -1000, -2000], atol=1e-3)
    assert np.isfinite(F.log_softmax(x).numpy()).all()


# --- losses ------------------------------------------------------------------------------------


@given(
    n=st.integers(1, 4),
    c=st.integers(1, 4),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=seeds,
)
def test_cross_entropy_matches_numpy_and_grads_order_3(n, c, reduction, seed, device):
    rng = _rng(seed)
    logits, labels = rng.standard_normal((n, c)) * 2, rng.integers(0, c, n)
    losses = -log_softmax_ref(logits, 1)[np.arange(n), labels]
    ref = {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]
    (z,) = _on(device, logits)
    out = F.cross_entropy(z, tm.tensor(labels, device=device), reduction)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12)
    # Host labels with device logits: they follow the logits.
    check_grads(lambda z: F.cross_entropy(z, labels, reduction), [z], order=3)
    nll = F.nll_loss(F.log_softmax(z, 1), labels, reduction)
    np.testing.assert_allclose(nll.numpy(), ref, rtol=1e-12)


def _composed_cross_entropy(z, labels, reduction):
    """The formula before the fused op: -log_softmax(z)[labels], from differentiable ops."""
    return F.nll_loss(F.log_softmax(z, 1), labels, reduction)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 5),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=seeds,
)
def test_fused_cross_entropy_matches_the_composed_formula_to_third_order(
    backend, n, c, reduction, seed
):
    # Loss weights that depend on the input make gloss require grad, so the second and third
    # derivatives go through both of SoftmaxCrossEntropyGrad's rules (for z and for gloss).
    from tinymeta import kernels

    rng = _rng(seed)
    z0, u0, labels = rng.standard_normal((n, c)) * 2, rng.standard_normal(n), rng.integers(0, c, n)

    def derivatives(loss_fn):
        z, u = tm.tensor(z0, requires_grad=True), tm.tensor(u0, requires_grad=True)
        losses = loss_fn(z, labels, "none") * tm.tanh(u * z.sum())
        loss = {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]
        out = [loss.sum()]
        for _ in range(3):  # first, second, third derivatives along fixed random directions
            gz, gu = tm.grad(out[-1], [z, u], create_graph=True)
            out.append((gz * tm.tensor(z0[::-1].copy())).sum() + (gu * gu).sum())
        return [t.item() for t in out]

    previous = kernels.set_backend(backend)
    try:
        got = derivatives(F.cross_entropy)
    finally:
        kernels.set_backend(previous)
    want = derivatives(_composed_cross_entropy)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_fused_cross_entropy_finite_differences_with_loss_weights():
    rng = _rng(3)
    z, w, labels = rng.standard_normal((4, 3)), rng.standard_normal(4), np.array([2, 0, 1, 2])
    check_grads(lambda z, w: (F.cross_entropy(z, labels, "none") * w).sum(), [z, w], order=3)


def test_fused_cross_entropy_keeps_float32_and_uses_one_node():
    z = tm.tensor(_rng(4).standard_normal((6, 5)).astype(np.float32), requires_grad=True)
    losses = F.cross_entropy(z, np.arange(6) % 5, reduction="none")
    assert losses.dtype == np.float32 and losses.grad_fn.op_name() == "SoftmaxCrossEntropy"
    (g,) = tm.grad(losses.sum(), [z])
    assert g.dtype == np.float32
    ref = np.exp(log_softmax_ref(z.numpy().astype(np.float64), 1))
    ref[np.arange(6), np.arange(6) % 5] -= 1
    np.testing.assert_allclose(g.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_cross_entropy_gradient_is_softmax_minus_one_hot():
    logits = tm.tensor(_rng(2).standard_normal((3, 4)), requires_grad=True)
    labels = np.array([3, 0, 0])
    F.cross_entropy(logits, labels, reduction="sum").backward()
    expected = np.exp(log_softmax_ref(logits.numpy(), 1))
    expected[np.arange(3), labels] -= 1
    np.testing.assert_allclose(logits.grad.numpy(), expected, rtol=1e-12)


def test_cross_entropy_stable_for_huge_logits():
    loss = F.cross_entropy(tm.tensor([[1e4, 0.0], [0.0, 1e4]]), [1, 1])
    np.testing.assert_allclose(loss.item(), 5e3, rtol=1e-6)


@pytest.mark.parametrize(
    "labels, exc, match",
    [
        (np.array([0.0, 1.0]), TypeError, r"cross_entropy: labels must be integer .* float64"),
        (np.array([0, 3]), ValueError, r"cross_entropy: labels must lie in \[0, 3\) .* \[0, 3\]"),
        (np.array([-1, 0]), ValueError, r"labels must lie in \[0, 3\)"),
        (np.array([0, 1, 2]), ValueError, r"cross_entropy: expected labels of shape \(2,\)"),
        ([True, False], TypeError, "labels must be integer"),
    ],
)
def test_cross_entropy_label_errors(labels, exc, match):
    with pytest.raises(exc, match=match):
        F.cross_entropy(tm.zeros(2, 3), labels)


def test_loss_reduction_error():
    with pytest.raises(ValueError, match="cross_entropy: reduction must be"):
        F.cross_entropy(tm.zeros(2, 3), [0, 1], reduction="avg")
    with pytest.raises(ValueError, match=r"mse_loss: pred has shape \(2, 3\) but target"):
        F.mse_loss(tm.zeros(2, 3), tm.zeros(3))


@given(
    shape=tms.shapes(min_dims=0, max_dims=3, max_side=4),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=seeds,
)
def test_mse_loss_matches_numpy_and_grads_order_3(shape, reduction, seed, device):
    rng = _rng(seed)
    pred, target = rng.standard_normal(shape), rng.standard_normal(shape)
    sq = (pred - target) ** 2
    ref = {"mean": sq.mean(), "sum": sq.sum(), "none": sq}[reduction]
    inputs = _on(device, pred, target)
    np.testing.assert_allclose(F.mse_loss(*inputs, reduction).numpy(), ref, rtol=1e-12)
    check_grads(lambda p, t: F.mse_loss(p, t, reduction), inputs, order=3)
