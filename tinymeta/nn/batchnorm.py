"""Batch normalisation with batch statistics, fused: one op forward, one kernel backward, any order.

Per task t and channel c, with mean and (biased) var over the batch and spatial axes and
n values in each such group:

    xhat = (x - mean) * inv_std,   inv_std = 1 / sqrt(var + eps)
    y    = xhat * w + b                                          BatchNormTrain(x, w, b)
    gx   = w * inv_std / n * (n * gy - sum(gy) - xhat * sum(gy * xhat))
    gw   = sum(gy * xhat),  gb = sum(gy)

The forward is one kernel call (``tinymeta.kernels``: Numba on the CPU, the array-module
reference on a GPU) instead of the dozen small ops the formula takes when composed; the
backward is one more kernel call that computes gx, gw and gb together. Each of the three
gradients is then recorded as its own single-output node (BatchNormGradInput, ...Weight,
...Bias) holding the kernel's value: the engine can free any one of them that nobody uses.
Their backward rules (the second derivatives) are written once, as the kernel reference
``bn_double_backward``: one kernel call when nobody will differentiate them again (grad mode
off, as in the outer backward of second-order MAML); when a graph is being recorded
(create_graph=True: third order and beyond) the same function runs on tensors, with the
statistics from differentiable ops (the mean, and InvStd(x) = inv_std, a fused op whose
backward uses Standardize(x) = xhat and vice versa), so every higher derivative is exact too.

The second derivatives, with P(v) = v - mean(v) - xhat * mean(v * xhat) (self-adjoint; the
Jacobian of xhat is inv_std * P), so that gx = w * inv_std * P(gy), and for incoming
ggx, ggw, ggb (A = ggx, B = gy, m_A = mean(A * xhat), m_B = mean(B * xhat), c = mean(A * P(B))):

    ggy = w * inv_std * P(A) + ggw * xhat + ggb
    gx' = -w * inv_std**2 * (m_B * P(A) + m_A * P(B) + c * xhat) + inv_std * ggw * P(B)
    gw' = inv_std * n * c

Inputs are (N, C), (N, C, H, W) or (T, N, C, H, W): a leading task axis, as task-vectorized
MAML runs every task's batch at once, with statistics per (task, channel) and a weight and
bias either shared, of shape (C,), or per task, of shape (T, C).
"""

from __future__ import annotations

from tinymeta import kernels
from tinymeta.function import Function
from tinymeta.grad_mode import is_grad_enabled
from tinymeta.ops.reductions import keepdims_shape
from tinymeta.ops.reductions import mean as _mean
from tinymeta.ops.shape import broadcast_to, reshape, sum_to
from tinymeta.tensor import Tensor


class BatchNormLayout:
    """Where the task, batch, channel and spatial axes of a batch-norm input are.

    The kernels see every input as (T, N, C, S) (S = H * W, T = 1 without a task axis);
    the differentiable ops in the backward rules work on the input's own shape, summing over
    ``axes`` and broadcasting per-(task, channel) values of ``stat_shape``.
    """

    def __init__(self, shape: tuple):
        self.shape = tuple(shape)
        if len(shape) == 2:
            (n, c), t, s, self.axes = shape, 1, 1, (0,)
        elif len(shape) == 4:
            (n, c, h, w), t, self.axes = shape, 1, (0, 2, 3)
            s = h * w
        elif len(shape) == 5:
            (t, n, c, h, w), self.axes = shape, (1, 3, 4)
            s = h * w
        else:
            raise ValueError(
                f"batch norm: expected an (N, C), (N, C, H, W) or (T, N, C, H, W) input, "
                f"got shape {self.shape}"
            )
        self.kernel_shape = (t, n, c, s)
        self.count = n * s  # values per (task, channel)
        self.stat_shape = keepdims_shape(self.shape, self.axes)  # (1, C, 1, 1), (T, 1, C, 1, 1)

    def to_kernel(self, array):
        """The (T, N, C, S) view of an input-shaped array (no copy for NCHW or NHWC memory)."""
        return array.reshape(self.kernel_shape)

    def from_kernel(self, array):
        return array.reshape(self.shape)

    def param_shape(self, shape: tuple) -> tuple:
        """The broadcastable shape of a (C,) or (T, C) parameter: (C,) has no task axis."""
        if len(shape) == 1 and len(self.shape) == 5:
            return (1,) + self.stat_shape[1:]
        return self.stat_shape


def _project(v, xhat, axes):
    """P(v) = v - mean(v) - xhat * mean(v * xhat): v without its components along 1 and xhat.

    P is self-adjoint, and the Jacobian of xhat with respect to x is inv_std * P.
    """
    return v - _mean(v, axes, keepdims=True) - xhat * _mean(v * xhat, axes, keepdims=True)


def _xhat_vjp(xhat, inv_std, g_xhat, g_inv_std, layout: BatchNormLayout):
    """gx = inv_std * P(g_xhat) - inv_std**2 / n * xhat * g_inv_std: the gradient through
    xhat and inv_std (either cotangent may be None), using d inv_std / dx = -inv_std**2 / n * xhat.
    """
    gx = None if g_xhat is None else inv_std * _project(g_xhat, xhat, layout.axes)
    if g_inv_std is not None:
        g_var_part = (inv_std * inv_std * (-1.0 / layout.count) * g_inv_std) * xhat
        gx = g_var_part if gx is None else gx + g_var_part
    return gx


class Standardize(Function):
    """xhat = (x - mean) * inv_std per (task, channel);  gx = InvStd(x) * P(g_xhat)."""

    saves_output = True

    def __init__(self, layout: BatchNormLayout, eps: float):
        self.layout, self.eps = layout, eps

    def forward(self, x):
        c = self.layout.kernel_shape[2]
        ones, zeros = self.xp.ones(c, dtype=x.dtype), self.xp.zeros(c, dtype=x.dtype)
        xhat, _, _ = kernels.bn_forward(self.layout.to_kernel(x), ones, zeros, self.eps)
        return self.layout.from_kernel(xhat)

    def backward(self, g_xhat):
        inv_std = inv_std_of(self.inputs[0], self.layout, self.eps)
        return _xhat_vjp(self.output, inv_std, g_xhat, None, self.layout)


class InvStd(Function):
    """inv_std = 1 / sqrt(var + eps) per (task, channel), of shape ``layout.stat_shape``;
    gx = -inv_std**2 / n * Standardize(x) * g_inv_std."""

    saves_output = True

    def __init__(self, layout: BatchNormLayout, eps: float):
        self.layout, self.eps = layout, eps

    def forward(self, x):
        _, inv_std = kernels.bn_stats(self.layout.to_kernel(x), self.eps)
        return inv_std.reshape(self.layout.stat_shape)

    def backward(self, g_inv_std):
        xhat = standardize(self.inputs[0], self.layout, self.eps)
        return _xhat_vjp(xhat, self.output, None, g_inv_std, self.layout)


def standardize(x, layout: BatchNormLayout, eps: float):
    return Standardize.apply(x, layout=layout, eps=eps)


def inv_std_of(x, layout: BatchNormLayout, eps: float):
    return InvStd.apply(x, layout=layout, eps=eps)


class BatchNormTrain(Function):
    """y = (x - mean) * inv_std * w + b with the batch's statistics;
    gx, gw, gb from one kernel call (see the module docstring), recorded as BatchNormGrad* nodes.

    ``record_stats(mean, inv_std)``, if given, receives the batch statistics as (T, C) arrays
    (F.batch_norm updates the running statistics with them).
    """

    def __init__(self, eps: float, record_stats=None):
        self.eps, self.record_stats = eps, record_stats

    def forward(self, x, w, b):
        self.layout = BatchNormLayout(x.shape)
        y, self.mean, self.inv_std = kernels.bn_forward(self.layout.to_kernel(x), w, b, self.eps)
        if self.record_stats is not None:
            self.record_stats(self.mean, self.inv_std)
        return self.layout.from_kernel(y)

    def backward(self, gy):
        x, w, b = self.inputs
        layout = self.layout
        gx, gw, gb = kernels.bn_backward(
            layout.to_kernel(gy.data.astype(x.dtype, copy=False)),
            layout.to_kernel(x.data),
            self.mean,
            self.inv_std,
            w.data,
        )
        need_x, need_w, need_b = self.needs_input_grad
        geometry = {"layout": layout, "eps": self.eps, "stats": (self.mean, self.inv_std)}
        if need_x:
            gx = BatchNormGradInput.apply(gy, x, w, value=layout.from_kernel(gx), **geometry)
        if need_w:  # gw, gb are per (task, channel): a weight shared by the tasks sums them
            gw = sum_to(BatchNormGradWeight.apply(gy, x, value=gw, **geometry), w.shape)
        if need_b:
            gb = sum_to(BatchNormGradBias.apply(gy, value=gb, layout=layout), b.shape)
        return gx if need_x else None, gw if need_w else None, gb if need_b else None


# The three gradient nodes return the value that BatchNormTrain.backward's kernel call already
# computed (``value``); what they add is the rule for differentiating it once more. They are
# three single-output nodes rather than one with three outputs: the engine frees any of them
# that nobody uses, and it cannot build the zero gradient of a freed output.


def _second_derivatives(node, gy, x, w, ggx=None, ggw=None):
    """(ggy, gx', gw') of <ggx, gx> + <ggw, gw>: ggy and gx' in x's shape (None unless needed),
    gw' summed to w's shape (None without w or unless needed). The rule is written once, as
    ``kernels.reference.bn_double_backward``.

    With grad mode off (the outer backward of second-order MAML) it is one kernel call on the
    arrays (Numba on the CPU), whose results are constants; benchmarks/PROFILE.md (Kernels)
    measures what the fused kernel saves. When a graph is recorded (third order and beyond) the
    same rule runs on tensors, with the statistics of x from differentiable ops (its mean and
    InvStd), so every higher derivative is exact.
    """
    layout = node.layout
    need_gy, need_x = node.needs_input_grad[:2]
    t, c = layout.kernel_shape[0], layout.kernel_shape[2]
    if is_grad_enabled():
        x4 = reshape(x, layout.kernel_shape)
        g_gy, g_x, g_w = kernels.reference.bn_double_backward(
            reshape(gy, layout.kernel_shape),
            x4,
            _mean(x4, (1, 3)),
            reshape(inv_std_of(x, layout, node.eps), (t, c)),
            None if w is None else broadcast_to(reshape(w, (-1, c)), (t, c)),
            ggx=None if ggx is None else reshape(ggx, layout.kernel_shape),
            ggw=ggw,
            ggb=None,
            need_gy=need_gy,
            need_x=need_x,
        )
        g_gy = reshape(g_gy, layout.shape) if need_gy else None
        g_x = reshape(g_x, layout.shape) if need_x else None
    else:
        g_gy, g_x, g_w = kernels.bn_double_backward(
            layout.to_kernel(gy.data),
            layout.to_kernel(x.data),
            *node.stats,
            weight=None if w is None else w.data,
            ggx=None if ggx is None else layout.to_kernel(ggx.data),
            ggw=None if ggw is None else ggw.data,
            need_gy=need_gy,
            need_x=need_x,
        )
        g_gy = Tensor._wrap(layout.from_kernel(g_gy)) if need_gy else None
        g_x = Tensor._wrap(layout.from_kernel(g_x)) if need_x else None
        g_w = Tensor._wrap(g_w)
    if w is None or not node.needs_input_grad[2]:
        return g_gy, g_x, None
    return g_gy, g_x, sum_to(g_w, w.shape)  # per (task, channel): a shared weight sums the tasks


class BatchNormGradInput(Function):
    """gx = w * inv_std / n * (n * gy - sum(gy) - xhat * sum(gy * xhat)) = w * inv_std * P(gy).

    Backward, with q = sum(ggx * P(gy)), the derivatives of <ggx, gx>:
        ggy = w * inv_std * P(ggx)
        gw  = inv_std * q
        gx' = through xhat and inv_std, with
              g_xhat = -w * inv_std * (ggx * mean(gy * xhat) + gy * mean(ggx * xhat))
              g_inv_std = w * q
    (the module docstring has them expanded; ``_second_derivatives`` computes them).
    """

    def __init__(self, layout: BatchNormLayout, eps: float, stats, value):
        self.layout, self.eps, self.stats, self.value = layout, eps, stats, value

    def forward(self, gy, x, w):
        return self.value

    def backward(self, ggx):
        gy, x, w = self.inputs
        return _second_derivatives(self, gy, x, w, ggx=ggx)


class BatchNormGradWeight(Function):
    """gw = sum(gy * xhat) per (task, channel), shape (T, C);
    ggy = ggw * xhat,  gx' = through xhat with g_xhat = ggw * gy."""

    def __init__(self, layout: BatchNormLayout, eps: float, stats, value):
        self.layout, self.eps, self.stats, self.value = layout, eps, stats, value

    def forward(self, gy, x):
        return self.value

    def backward(self, ggw):
        gy, x = self.inputs
        return _second_derivatives(self, gy, x, None, ggw=ggw)[:2]


class BatchNormGradBias(Function):
    """gb = sum(gy) per (task, channel), shape (T, C);  ggy = ggb broadcast over the batch."""

    saves_inputs = False

    def __init__(self, layout: BatchNormLayout, value):
        self.layout, self.value = layout, value

    def forward(self, gy):
        return self.value

    def backward(self, ggb):
        return broadcast_to(reshape(ggb, self.layout.stat_shape), self.layout.shape)


def batch_norm_train(x, weight, bias, eps: float = 1e-5, record_stats=None):
    """The fused training-mode batch norm of tensors x, weight, bias (see the module docstring).

    Shapes are not checked here: ``tinymeta.nn.functional.batch_norm`` is the checked entry point.
    """
    return BatchNormTrain.apply(x, weight, bias, eps=eps, record_stats=record_stats)
