"""Convolution and pooling with a leading task axis (task-vectorized MAML).

``F.conv2d`` with x (T, N, C, H, W) and per-task w (T, O, C, kh, kw), b (T, O)
must equal a Python loop of 4-D convolutions over the tasks (values and
gradients), have correct derivatives of orders 1-3 (float64 finite
differences), and make ``maml_loss(..., vectorized=True)`` on a conv net equal
the looped meta-objective and meta-gradient. The 4-D convolution it is compared
with is itself checked against naive loops in test_nn_functional.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta import nn
from tinymeta.meta import maml_loss, per_task
from tinymeta.testing import check_grads

seeds = st.integers(0, 2**32 - 1)
small_pairs = st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 2), st.integers(1, 2)))


@st.composite
def batched_conv_cases(draw):
    """(x shape, w shape, stride, padding) with a task axis: T, N, C, O <= 3, H, W <= 6."""
    t, n = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    c, o = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = draw(small_pairs)
    padding = draw(st.one_of(st.integers(0, 1), st.tuples(st.integers(0, 1), st.integers(0, 1))))
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    h = draw(st.integers(max(1, kh - 2 * ph), 6))
    w = draw(st.integers(max(1, kw - 2 * pw), 6))
    return (t, n, c, h, w), (t, o, c, kh, kw), stride, padding


def looped_conv2d(x, w, b, stride, padding):
    """The definition: task t's images convolved with task t's weights, one task at a time."""
    ys = []
    for t in range(x.shape[0]):
        wt = w[t] if w.ndim == 5 else w
        bt = None if b is None else (b[t] if b.ndim == 2 else b)
        ys.append(F.conv2d(x[t], wt, bt, stride, padding))
    return tm.stack(ys, 0)


def draw_inputs(rng, x_shape, w_shape, bias: str, shared_weight: bool = False):
    """float64 leaves x, w, b; ``bias`` is 'per-task', 'shared' or 'none'."""
    x = tm.tensor(rng.standard_normal(x_shape), requires_grad=True)
    w = tm.tensor(rng.standard_normal(w_shape[1:] if shared_weight else w_shape))
    w.requires_grad_()
    t, o = w_shape[0], w_shape[1]
    b_shape = {"per-task": (t, o), "shared": (o,), "none": None}[bias]
    b = None if b_shape is None else tm.tensor(rng.standard_normal(b_shape), requires_grad=True)
    return x, w, b


def grads_of(y, inputs, seed=0):
    """Gradients of <v, y> for a fixed random cotangent v."""
    v = np.random.default_rng(seed).standard_normal(y.shape)
    gs = tm.grad((y * tm.tensor(v)).sum(), [i for i in inputs if i is not None])
    return [g.numpy() for g in gs]


# --- values and gradients equal the loop over tasks -----------------------------------------------


@given(
    case=batched_conv_cases(),
    bias=st.sampled_from(["per-task", "shared", "none"]),
    shared_weight=st.booleans(),
    seed=seeds,
)
def test_batched_conv2d_equals_the_loop_over_tasks(case, bias, shared_weight, seed):
    x_shape, w_shape, stride, padding = case
    x, w, b = draw_inputs(np.random.default_rng(seed), x_shape, w_shape, bias, shared_weight)
    y = F.conv2d(x, w, b, stride, padding)
    ref = looped_conv2d(x, w, b, stride, padding)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads_of(y, [x, w, b]), grads_of(ref, [x, w, b])):
        np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-12)


def test_batched_conv2d_is_one_op_over_all_tasks_and_keeps_float32_channels_last():
    """One Conv2d node holds the 5-D input and weight (no per-task ops), and the output, as in
    the 4-D case, is an NCHW-shaped view of channels-last memory."""
    rng = np.random.default_rng(0)
    x = tm.tensor(rng.standard_normal((3, 2, 4, 6, 6)).astype(np.float32))
    w = tm.tensor(rng.standard_normal((3, 5, 4, 3, 3)).astype(np.float32), requires_grad=True)
    b = tm.tensor(np.zeros((3, 5), np.float32), requires_grad=True)
    y = F.conv2d(x, w, b, padding=1)
    assert type(y.grad_fn).__name__ == "Conv2d"
    assert [i.shape for i in y.grad_fn.inputs] == [x.shape, w.shape, b.shape]
    assert y.shape == (3, 2, 5, 6, 6) and y.dtype == np.float32
    assert y.data.transpose(0, 1, 3, 4, 2).flags["C_CONTIGUOUS"]
    ref = looped_conv2d(x, w, b, 1, 1).numpy()
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_batched_conv2d_gradients_match_the_loop():
    """Gradients w.r.t. x, w and b at stride 2 with padding, against the loop."""
    rng = np.random.default_rng(1)
    x, w, b = draw_inputs(rng, (3, 2, 3, 7, 6), (3, 4, 3, 3, 2), "per-task")
    y = F.conv2d(x, w, b, stride=2, padding=1)
    ref = looped_conv2d(x, w, b, 2, 1)
    gx, gw, gb = grads_of(y, [x, w, b])
    rx, rw, rb = grads_of(ref, [x, w, b])
    np.testing.assert_allclose(gx, rx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gw, rw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gb, rb, rtol=1e-10, atol=1e-12)
    # Task t's weight gradient depends on task t's input only.
    x2 = tm.tensor(x.numpy().copy())
    x2.data[1] += 1.0
    y2 = F.conv2d(x2, w, b, stride=2, padding=1)
    gw2 = grads_of(y2, [w])[0]
    np.testing.assert_array_equal(gw2[[0, 2]], gw[[0, 2]])
    assert not np.allclose(gw2[1], gw[1])


# --- derivatives of orders 1, 2 and 3 against finite differences (float64) ------------------------


@pytest.mark.parametrize(
    "stride, padding", [(1, 0), (2, 1), ((2, 1), (0, 1))], ids=["plain", "stride2-pad1", "mixed"]
)
def test_batched_conv2d_gradcheck_and_gradgradcheck(stride, padding, device):
    rng = np.random.default_rng(2)
    x = tm.tensor(rng.standard_normal((2, 2, 2, 5, 5)), device=device)
    w = tm.tensor(rng.standard_normal((2, 3, 2, 3, 3)), device=device)
    b = tm.tensor(rng.standard_normal((2, 3)), device=device)
    tm.testing.gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride, padding), [x, w, b])
    tm.testing.gradgradcheck(lambda x, w, b: F.conv2d(x, w, b, stride, padding), [x, w, b])


def test_batched_conv2d_third_order_directional():
    """Order 3, as MAML's meta-gradient of a second-order inner loop needs: the check is
    directional (v^T J u against a finite difference) at every order."""
    rng = np.random.default_rng(3)
    x = tm.tensor(rng.standard_normal((2, 1, 2, 5, 4)))
    w = tm.tensor(rng.standard_normal((2, 2, 2, 3, 2)))
    b = tm.tensor(rng.standard_normal((2, 2)))
    check_grads(lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), [x, w, b], order=3)


@given(case=batched_conv_cases(), shared_weight=st.booleans(), seed=seeds)
def test_batched_conv2d_grads_order_2_hypothesis(case, shared_weight, seed):
    x_shape, w_shape, stride, padding = case
    x, w, b = draw_inputs(np.random.default_rng(seed), x_shape, w_shape, "per-task", shared_weight)
    check_grads(lambda x, w, b: F.conv2d(x, w, b, stride, padding), [x, w, b], order=2)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "xs, ws, bs, match",
    [
        ((3, 1, 2, 5, 5), (2, 4, 2, 3, 3), None, r"conv2d: the input has 3 tasks .* weight has 2"),
        ((3, 1, 2, 5, 5), (3, 4, 2, 3, 3), (2, 4), r"conv2d: the input has 3 tasks .* bias has 2"),
        ((3, 1, 2, 5, 5), (4, 2, 3, 3), (2, 4), r"conv2d: the input has 3 tasks .* bias has 2"),
        ((1, 2, 5, 5), (3, 4, 2, 3, 3), None, r"conv2d: per-task weights .* need an input with"),
        ((1, 2, 5, 5), (4, 2, 3, 3), (3, 4), r"conv2d: per-task weights .* need an input with"),
        ((3, 1, 2, 5, 5), (3, 4, 3, 3, 3), None, r"conv2d: input has 2 channels .* expects 3"),
        ((3, 1, 2, 5, 5), (3, 4, 2, 3, 3), (3, 5), r"conv2d: bias must have shape \(4,\)"),
        ((3, 1, 2, 5, 5), (3, 4, 2, 3, 3), (1, 3, 4), r"conv2d: bias must have shape \(4,\)"),
        ((2, 3, 1, 2, 5, 5), (4, 2, 3, 3), None, r"conv2d: expected a 4-D input .* 5-D input"),
        ((3, 1, 2, 2, 2), (3, 4, 2, 3, 3), None, r"conv2d: kernel height 3 exceeds"),
    ],
)
def test_batched_conv2d_errors_name_the_op_and_shapes(xs, ws, bs, match):
    b = None if bs is None else tm.zeros(*bs)
    with pytest.raises(ValueError, match=match):
        F.conv2d(tm.zeros(*xs), tm.zeros(*ws), b)


def test_max_pool2d_rejects_other_ranks():
    with pytest.raises(ValueError, match=r"max_pool2d: expected a 4-D input .* task axis"):
        F.max_pool2d(tm.zeros(1, 1, 1, 1, 4, 4), 2)


# --- pooling --------------------------------------------------------------------------------------


@given(
    tasks=st.integers(1, 3),
    shape=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(2, 6), st.integers(2, 6)),
    kernel=st.integers(1, 2),
    stride=st.one_of(st.none(), st.integers(1, 2)),
    seed=seeds,
)
def test_max_pool2d_with_task_axis_equals_the_loop(tasks, shape, kernel, stride, seed):
    # Distinct values: no ties, so that finite differences never straddle an arg-max switch.
    values = np.random.default_rng(seed).permutation(tasks * int(np.prod(shape)))
    x = tm.tensor(values.reshape((tasks,) + shape) / 7.0, requires_grad=True)
    y = F.max_pool2d(x, kernel, stride)
    ref = tm.stack([F.max_pool2d(x[t], kernel, stride) for t in range(tasks)], 0)
    np.testing.assert_array_equal(y.numpy(), ref.numpy())
    np.testing.assert_array_equal(grads_of(y, [x])[0], grads_of(ref, [x])[0])
    check_grads(lambda x: F.max_pool2d(x, kernel, stride), [x], order=2)


# --- modules: functional_call with per-task parameters --------------------------------------------


def conv_net(batch_norm: bool = False, seed: int = 0) -> nn.Module:
    """A small float64 Omniglot-style net: [conv -> (BN) -> ReLU -> max-pool] x 2 -> linear."""
    rng = np.random.default_rng(seed)
    layers, c = [], 1
    for _ in range(2):
        layers.append(nn.Conv2d(c, 3, 3, padding=1, dtype=tm.float64, rng=rng))
        if batch_norm:
            layers.append(nn.BatchNorm2d(3, track_running_stats=False, dtype=tm.float64))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c = 3
    # Flatten(-3): merges (C, H, W) whether or not a task axis leads.
    return nn.Sequential(
        *layers, nn.Flatten(-3), nn.Linear(3 * 2 * 2, 3, dtype=tm.float64, rng=rng)
    )


def test_functional_call_with_per_task_parameters_equals_one_call_per_task():
    model = conv_net()
    rng = np.random.default_rng(4)
    x = tm.tensor(rng.standard_normal((3, 4, 1, 8, 8)))
    # Different parameters per task: the meta-parameters plus per-task noise.
    params = {
        k: p + tm.tensor(0.1 * rng.standard_normal(p.shape))
        for k, p in per_task(dict(model.named_parameters()), 3).items()
    }
    y = nn.functional_call(model, params, x)
    assert y.shape == (3, 4, 3)
    for t in range(3):
        yt = nn.functional_call(model, {k: p[t] for k, p in params.items()}, x[t])
        np.testing.assert_allclose(y.numpy()[t], yt.numpy(), rtol=1e-12, atol=1e-12)
    # The shared-weight path (ANIL's body): a 5-D input through the module's own weights.
    y_shared = model(x)
    for t in range(3):
        np.testing.assert_allclose(y_shared.numpy()[t], model(x[t]).numpy(), rtol=1e-12)


def conv_tasks(num_tasks=3, n=4, seed=0):
    """Three-class 1x8x8 'images', a bright square whose place is the class."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.5, (num_tasks, 2 * n, 1, 8, 8))
    y = np.tile(np.arange(3), (num_tasks, (2 * n + 2) // 3))[:, : 2 * n]
    for t, i in np.ndindex(y.shape):
        x[t, i, 0, 2 * y[t, i] : 2 * y[t, i] + 3, 2:5] += 1.0
    support = (tm.tensor(x[:, :n]), tm.tensor(y[:, :n]))
    query = (tm.tensor(x[:, n:]), tm.tensor(y[:, n:]))
    return support, query


def cross_entropy(logits, labels):
    """Mean cross-entropy over every example, with or without a task axis."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.numpy().reshape(-1))


def _vectorized_equals_looped(model, steps: int, first_order: bool = False, keys=None):
    support, query = conv_tasks()
    results = []
    for vectorized in (True, False):
        params = {k: tm.tensor(p.numpy(), requires_grad=True) for k, p in model.named_parameters()}

        def forward(p, x):
            return nn.functional_call(model, p, x)

        loss = maml_loss(
            forward, params, support, query, cross_entropy, 0.3, steps,
            first_order=first_order, keys=keys, vectorized=vectorized,
        )  # fmt: skip
        grads = tm.grad(loss, list(params.values()))
        results.append((float(loss), {k: g.numpy() for k, g in zip(params, grads)}))
    (lv, gv), (ll, gl) = results
    assert lv == pytest.approx(ll, rel=1e-10)
    for k in gl:
        np.testing.assert_allclose(gv[k], gl[k], rtol=1e-8, atol=1e-11, err_msg=k)
    assert max(np.abs(g).max() for g in gv.values()) > 1e-3
    return gv


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_loss_vectorized_equals_looped_on_a_conv_net(steps):
    gv = _vectorized_equals_looped(conv_net(), steps)
    # Second order: the meta-gradient differs from the first-order one.
    g1 = _vectorized_equals_looped(conv_net(), steps, first_order=True)
    assert max(np.abs(gv[k] - g1[k]).max() for k in gv) > 1e-6


def test_maml_loss_vectorized_equals_looped_anil_shared_body():
    """Only the head gets a task axis: the convolutions run with shared weights on 5-D input."""
    _vectorized_equals_looped(conv_net(), 2, keys=["7.weight", "7.bias"])


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_loss_vectorized_equals_looped_on_a_conv_batchnorm_net(steps):
    """BatchNorm2d with a task axis takes each task's own batch statistics (F.batch_norm)."""
    _vectorized_equals_looped(conv_net(batch_norm=True), steps)
