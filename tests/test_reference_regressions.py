"""Two places where tinymeta is right and a reference implementation is not (issue 11).

Kept as tests so that a later change cannot "fix" tinymeta to agree with the reference:

1. The third derivative of training-mode batch norm with respect to its input. tinymeta's fused
   op (``F.batch_norm``) must equal batch norm composed from its own mean/var ops. PyTorch
   2.13's native ``batch_norm`` differs from its own composed version at third order (its
   double-backward formula is not itself differentiated exactly), so comparing with it would
   be comparing with a wrong number.
2. The second-order MAML meta-gradient through batch norm under a task axis (task-vectorized:
   statistics per task and channel) equals the one computed task by task.
"""

from __future__ import annotations

import numpy as np
import pytest

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta.meta import maml_loss


def composed_batch_norm(x, weight, bias, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias from tinymeta's differentiable ops."""
    axes = {2: (0,), 4: (0, 2, 3), 5: (1, 3, 4)}[x.ndim]
    channel = 2 if x.ndim == 5 else 1
    param_shape = [1] * x.ndim
    param_shape[channel] = x.shape[channel]
    if weight.ndim == 2:  # per-task (T, C) parameters
        param_shape[0] = x.shape[0]
    mean = tm.mean(x, axis=axes, keepdims=True)
    var = tm.var(x, axis=axes, keepdims=True)
    xhat = (x - mean) / tm.sqrt(var + eps)
    return xhat * weight.reshape(tuple(param_shape)) + bias.reshape(tuple(param_shape))


def directional_derivatives(fn, x0, seed=0):
    """(d1, d2, d3): gradient of <w, fn(x)>, then of <u, d1>, then of <v, d2>, all at x0."""
    rng = np.random.default_rng(seed)
    x = tm.tensor(x0, requires_grad=True)
    y = fn(x)
    w, u, v = (tm.tensor(rng.standard_normal(s)) for s in (y.shape, x0.shape, x0.shape))
    (d1,) = tm.grad((y * w).sum(), x, create_graph=True)
    (d2,) = tm.grad((d1 * u).sum(), x, create_graph=True)
    (d3,) = tm.grad((d2 * v).sum(), x)
    return d1.numpy(), d2.numpy(), d3.numpy()


@pytest.mark.parametrize(
    ("shape", "param_shape"),
    [((6, 3), (3,)), ((4, 3, 2, 2), (3,)), ((2, 3, 3, 2, 2), (3,)), ((2, 3, 3, 2, 2), (2, 3))],
    ids=["NC", "NCHW", "task-axis", "task-axis-per-task-affine"],
)
def test_batch_norm_third_derivative_equals_the_composed_one(shape, param_shape):
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal(shape)
    weight = tm.tensor(rng.uniform(0.5, 1.5, param_shape))
    bias = tm.tensor(rng.standard_normal(param_shape))
    fused = directional_derivatives(
        lambda x: F.batch_norm(x, None, None, weight, bias, training=True), x0
    )
    composed = directional_derivatives(lambda x: composed_batch_norm(x, weight, bias), x0)
    for order, (a, b) in enumerate(zip(fused, composed), start=1):
        assert np.abs(b).max() > 1e-3, order  # a non-trivial derivative
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11, err_msg=f"order {order}")


def test_batch_norm_third_derivative_on_a_constant_channel():
    # var = 0 in channel 0: inv_std = 1 / sqrt(eps) is large; the fused rule must still agree
    x0 = np.array([[1.0, 2.0], [1.0, 3.0], [1.0, 4.0]])
    one, zero = tm.tensor(np.ones(2)), tm.tensor(np.zeros(2))
    fused = directional_derivatives(lambda x: F.batch_norm(x, None, None, training=True), x0)
    composed = directional_derivatives(lambda x: composed_batch_norm(x, one, zero), x0)
    for order, (a, b) in enumerate(zip(fused, composed), start=1):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-6, err_msg=f"order {order}")


# --- task-vectorized MAML through batch norm ------------------------------------------------------


def conv_bn_forward(p, x):
    """conv -> batch norm (batch statistics) -> relu -> linear, for (N, 1, 5, 5) images or
    (T, N, 1, 5, 5) with per-task parameters (a leading task axis on every parameter)."""
    h = F.conv2d(x, p["conv.w"], p["conv.b"])
    h = F.batch_norm(h, None, None, p["bn.w"], p["bn.b"], training=True)
    h = F.relu(h)
    h = h.reshape(h.shape[:-3] + (-1,))
    return F.linear(h, p["fc.w"], p["fc.b"])


def conv_bn_params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {
        "conv.w": (2, 1, 3, 3),
        "conv.b": (2,),
        "bn.w": (2,),
        "bn.b": (2,),
        "fc.w": (2, 2 * 3 * 3),
        "fc.b": (2,),
    }
    params = {k: 0.5 * rng.standard_normal(s) for k, s in shapes.items()}
    params["bn.w"] += 1.0
    return params


@pytest.mark.parametrize("steps", [1, 2])
def test_vectorized_maml_through_batch_norm_equals_looped(steps):
    rng = np.random.default_rng(3)
    t, n = 3, 4
    support = (
        tm.tensor(rng.standard_normal((t, n, 1, 5, 5))),
        tm.tensor(rng.normal(size=(t, n, 2))),
    )
    query = (tm.tensor(rng.standard_normal((t, n, 1, 5, 5))), tm.tensor(rng.normal(size=(t, n, 2))))
    theta = conv_bn_params()
    results = []
    for vectorized in (True, False):
        params = {k: tm.tensor(v.copy(), requires_grad=True) for k, v in theta.items()}
        loss = maml_loss(
            conv_bn_forward, params, support, query, F.mse_loss, 0.3, steps, vectorized=vectorized
        )
        grads = tm.grad(loss, list(params.values()))
        results.append((float(loss), {k: g.numpy() for k, g in zip(params, grads)}))
    (loss_v, grads_v), (loss_l, grads_l) = results
    assert loss_v == pytest.approx(loss_l, rel=1e-12)
    for k in theta:
        if k != "conv.b":  # batch norm removes a per-channel shift: conv.b's gradient is 0
            assert np.abs(grads_l[k]).max() > 1e-4, k
        np.testing.assert_allclose(grads_v[k], grads_l[k], rtol=1e-9, atol=1e-12, err_msg=k)
