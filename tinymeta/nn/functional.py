"""Stateless layers and losses: ``import tinymeta.nn.functional as F``.

Every function here is differentiable to any order: each op's backward rule is
built from differentiable ops (MAML differentiates through the gradient of
these layers). Layouts follow PyTorch: images are NCHW, a linear weight is
(out, in), a convolution weight is (out, in, kh, kw).
"""

from __future__ import annotations

import numpy as np

from tinymeta import kernels
from tinymeta.backend import device_of, get_array_module, to_numpy
from tinymeta.function import Function
from tinymeta.grad_mode import no_grad
from tinymeta.nn.batchnorm import BatchNormLayout, batch_norm_train
from tinymeta.nn.conv import Conv2d, pair
from tinymeta.nn.functional_activation import dropout, erf, gelu, sigmoid, tanh
from tinymeta.nn.functional_attention import embedding, layer_norm, multi_head_attention
from tinymeta.nn.functional_linear import (  # the op classes stay importable from here
    Linear,  # noqa: F401
    LinearGradInput,  # noqa: F401
    LinearGradWeight,  # noqa: F401
    linear,
)
from tinymeta.nn.functional_recurrent import (
    gru,
    gru_cell,
    lstm,
    lstm_cell,
    rnn,
    rnn_relu_cell,
    rnn_tanh_cell,
)
from tinymeta.nn.softmax_xent import softmax_cross_entropy
from tinymeta.ops.elementwise import relu as _relu
from tinymeta.ops.reductions import mean as _mean
from tinymeta.ops.reductions import mean_square, squared_sum
from tinymeta.ops.reductions import sum as _sum
from tinymeta.ops.shape import broadcast_to, expand_dims, reshape
from tinymeta.ops.softmax import log_softmax, softmax
from tinymeta.tensor import Tensor, as_input, constant

__all__ = [
    "batch_norm",
    "conv2d",
    "cross_entropy",
    "dropout",
    "embedding",
    "erf",
    "gelu",
    "gru",
    "gru_cell",
    "layer_norm",
    "linear",
    "log_softmax",
    "lstm",
    "lstm_cell",
    "max_pool2d",
    "mse_loss",
    "multi_head_attention",
    "nll_loss",
    "relu",
    "rnn",
    "rnn_relu_cell",
    "rnn_tanh_cell",
    "sigmoid",
    "softmax",
    "tanh",
]


# --- convolution and pooling ---------------------------------------------------------------


def conv2d(x, w, b=None, stride=1, padding=0) -> Tensor:
    """y[n,o,i,j] = sum_{c,p,q} x_pad[n,c,i*s+p,j*s+q] w[o,c,p,q] + b[o]  (NCHW, cross-correlation).

    ``stride`` and ``padding`` (zeros) are an int or an (h, w) pair. The
    forward is one GEMM over the im2col windows; the gradients are the ops
    Conv2dGradInput (a transposed convolution) and Conv2dGradWeight, whose own
    gradients are convolutions again, so every order is available.

    Task axis (task-vectorized MAML, ``functional_call`` with per-task
    parameters): x of shape (T, N, C, H, W) with w (T, O, C, kh, kw) and b
    (T, O) convolves task t's images with task t's weights, as batched GEMMs
    (no loop over tasks); y is (T, N, O, OH, OW). A shared w (O, C, kh, kw) or
    b (O,) broadcasts over the tasks.
    """
    x, w = as_input(x, "conv2d", "x"), as_input(w, "conv2d", "w")
    b = None if b is None else as_input(b, "conv2d", "b")
    stride, padding = pair(stride, "stride", "conv2d"), pair(padding, "padding", "conv2d")
    if min(stride) < 1:
        raise ValueError(f"conv2d: stride must be positive, got {stride}")
    _check_conv_shapes(x, w, b, padding)
    per_task = w.ndim == 5 or (b is not None and b.ndim == 2)
    if x.ndim == 5 and not per_task:
        # One set of weights for every task: fold the tasks into the batch (one bigger GEMM).
        y = _conv2d(reshape(x, (-1,) + x.shape[2:]), w, b, stride, padding)
        return reshape(y, x.shape[:2] + y.shape[1:])
    if per_task:  # a shared weight or bias next to a per-task one: copies for every task
        w = _per_task(w, x.shape[0], 4)
        b = None if b is None else _per_task(b, x.shape[0], 1)
    return _conv2d(x, w, b, stride, padding)


def _conv2d(x, w, b, stride: tuple, padding: tuple) -> Tensor:
    if b is None:
        return Conv2d.apply(x, w, stride=stride, padding=padding)
    return Conv2d.apply(x, w, b, stride=stride, padding=padding)


def _per_task(t: Tensor, tasks: int, ndim: int) -> Tensor:
    """``t`` with a leading task axis: as it is if it has one, else broadcast (differentiably)."""
    return t if t.ndim > ndim else broadcast_to(expand_dims(t, 0), (tasks,) + t.shape)


def _check_conv_shapes(x: Tensor, w: Tensor, b, padding: tuple) -> None:
    """Raise a ValueError naming the shapes unless x, w and b fit together (see conv2d)."""
    if x.ndim not in (4, 5) or w.ndim not in (4, 5):
        raise ValueError(
            f"conv2d: expected a 4-D input (N, C, H, W) and a 4-D weight (O, C, kh, kw), or "
            f"with a task axis a 5-D input (T, N, C, H, W) and a weight (T, O, C, kh, kw) or "
            f"(O, C, kh, kw); got shapes {x.shape} and {w.shape}"
        )
    o = w.shape[-4]
    if b is not None and (b.ndim not in (1, 2) or b.shape[-1] != o):
        raise ValueError(
            f"conv2d: bias must have shape ({o},), or (T, {o}) with a task axis, got {b.shape} "
            f"(weight shape {w.shape})"
        )
    if w.ndim == 5 or (b is not None and b.ndim == 2):
        if x.ndim != 5:
            raise ValueError(
                f"conv2d: per-task weights (weight shape {w.shape}, bias shape "
                f"{None if b is None else b.shape}) need an input with a task axis "
                f"(T, N, C, H, W), got shape {x.shape}"
            )
        for name, t, ndim in (("weight", w, 5), ("bias", b, 2)):
            if t is not None and t.ndim == ndim and t.shape[0] != x.shape[0]:
                raise ValueError(
                    f"conv2d: the input has {x.shape[0]} tasks (shape {x.shape}) but the "
                    f"{name} has {t.shape[0]} (shape {t.shape}): the task axes must match"
                )
    if x.shape[-3] != w.shape[-3]:
        raise ValueError(
            f"conv2d: input has {x.shape[-3]} channels (shape {x.shape}) but the weight "
            f"expects {w.shape[-3]} (weight shape {w.shape})"
        )
    for axis, name in ((0, "height"), (1, "width")):
        size, k = x.shape[-2 + axis] + 2 * padding[axis], w.shape[-2 + axis]
        if k > size:
            raise ValueError(
                f"conv2d: kernel {name} {k} exceeds the padded input {name} {size} "
                f"(input shape {x.shape}, weight shape {w.shape}, padding {padding})"
            )


class Gather(Function):
    """y = x.flat[index] (distinct positions);  gx = Scatter(gy): zeros with gy at index."""

    saves_inputs = False

    def __init__(self, index):
        self.index = index

    def forward(self, x):
        self.in_shape = x.shape
        return x.reshape(-1)[self.index]

    def backward(self, gy):
        return Scatter.apply(gy, index=self.index, shape=self.in_shape)


class Scatter(Function):
    """y = zeros(shape); y.flat[index] = gy (distinct positions);  ggy = Gather(ggx)."""

    saves_inputs = False

    def __init__(self, index, shape: tuple):
        self.index, self.shape = index, shape

    def forward(self, gy):
        out = self.xp.zeros(int(np.prod(self.shape)), dtype=gy.dtype)
        out[self.index.reshape(-1)] = gy.reshape(-1)
        return out.reshape(self.shape)

    def backward(self, ggx):
        return Gather.apply(ggx, index=self.index)


class _Pool(Function):
    """Shared by the max-pool ops: the window geometry and each window's arg-max offset.

    The array work is in ``tinymeta.kernels`` (Numba loops on the CPU, the vectorized
    reference on a GPU or with TINYMETA_KERNELS=numpy).
    """

    saves_inputs = False

    def __init__(self, kernel_size: tuple, stride: tuple, in_shape: tuple, argmax=None):
        self.kernel_size, self.stride, self.in_shape = kernel_size, stride, in_shape
        self.argmax = argmax

    def geometry(self) -> dict:
        """The parameters that build a partner op over the same windows and arg-max."""
        return {
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "in_shape": self.in_shape,
            "argmax": self.argmax,
        }


class MaxPool2d(_Pool):
    """y[n,c,i,j] = max_{p,q} x[n,c,i*sh+p,j*sw+q];  gx = PoolScatter(gy) to each arg-max.

    The arg-max offset p * kw + q of every window is found here and then fixed, so
    the op is a gather: its gradient is a scatter, whose gradient is the gather
    again (any order). Ties go to the first maximal element of a window in
    row-major order.
    """

    def forward(self, x):
        y, self.argmax = kernels.maxpool2d_argmax(x, *self.kernel_size, *self.stride)
        return y

    def backward(self, gy):
        return PoolScatter.apply(gy, **self.geometry())


class PoolScatter(_Pool):
    """gx[n,c,i*sh+p,j*sw+q] += gy[n,c,i,j] where (p, q) is window (i, j)'s arg-max;
    ggy = PoolGather(ggx)."""

    def forward(self, gy):
        h, w = self.in_shape[2:]
        return kernels.maxpool2d_scatter(gy, self.argmax, *self.kernel_size, *self.stride, h, w)

    def backward(self, ggx):
        return PoolGather.apply(ggx, **self.geometry())


class PoolGather(_Pool):
    """y[n,c,i,j] = x[n,c,i*sh+p,j*sw+q] at window (i, j)'s arg-max (p, q);
    gx = PoolScatter(gy)."""

    def forward(self, x):
        return kernels.maxpool2d_gather(x, self.argmax, *self.kernel_size, *self.stride)

    def backward(self, gy):
        return PoolScatter.apply(gy, **self.geometry())


def max_pool2d(x, kernel_size, stride=None) -> Tensor:
    """y[n,c,i,j] = max_{p,q} x[n,c,i*s+p,j*s+q];  gx = gy routed to each window's arg-max.

    ``kernel_size`` and ``stride`` are an int or an (h, w) pair; ``stride``
    defaults to ``kernel_size``; no padding. Piecewise linear: the second
    derivative is zero almost everywhere and the gradient of the gradient still
    flows (gather <-> scatter). Ties go to the first maximal element of a window
    (row-major), so exactly one input receives each output's gradient.

    A 5-D input (T, N, C, H, W) (a leading task axis) is pooled like T*N images:
    pooling has no weights, so the tasks are simply folded into the batch.
    """
    x = as_input(x, "max_pool2d", "x")
    kernel = pair(kernel_size, "kernel_size", "max_pool2d")
    stride = pair(stride if stride is not None else kernel, "stride", "max_pool2d")
    if x.ndim not in (4, 5):
        raise ValueError(
            f"max_pool2d: expected a 4-D input (N, C, H, W), or (T, N, C, H, W) with a task "
            f"axis, got shape {x.shape}"
        )
    if min(kernel + stride) < 1:
        raise ValueError(
            f"max_pool2d: kernel_size and stride must be positive, got {kernel} and {stride}"
        )
    if kernel[0] > x.shape[-2] or kernel[1] > x.shape[-1]:
        raise ValueError(
            f"max_pool2d: kernel {kernel} is larger than the input's spatial size "
            f"(input shape {x.shape})"
        )
    images = x if x.ndim == 4 else reshape(x, (-1,) + x.shape[2:])  # tasks into the batch
    y = MaxPool2d.apply(images, kernel_size=kernel, stride=stride, in_shape=images.shape)
    return y if x.ndim == 4 else reshape(y, x.shape[:2] + y.shape[1:])


# --- normalisation ---------------------------------------------------------------------------


def _stat_array(stat):
    return stat.data if isinstance(stat, Tensor) else stat


def _update_running(stat, batch_value, momentum: float) -> None:
    """stat <- (1 - momentum) stat + momentum batch_value, in place and outside the graph."""
    new = (1.0 - momentum) * _stat_array(stat) + momentum * batch_value
    if isinstance(stat, Tensor):
        with no_grad():
            stat.copy_(new)  # bumps the version counter, like any in-place change
    else:
        stat[...] = new


def batch_norm(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias, per channel (axis 1 of (N, C) or NCHW).

    A 5-D input (T, N, C, H, W) carries a leading task axis (task-vectorized MAML): its
    statistics are per (task, channel), and weight and bias may be (C,) or per task (T, C).

    Training: mean and (biased) var are the batch's, over every axis but the channel (and
    task) one, and the gradient flows through them: one fused op (tinymeta.nn.batchnorm)
    whose derivatives of every order are exact. If running statistics are given (arrays or
    tensors of shape (C,)), they are updated in place outside the graph, with the unbiased
    batch variance, as PyTorch does: ``running = (1 - momentum) * running + momentum * batch``
    (for a task axis, with the mean over tasks of the per-task statistics).
    Evaluation: the running statistics are used as constants.
    """
    x = as_input(x, "batch_norm", "x")
    if x.ndim not in (2, 4, 5):
        raise ValueError(
            f"batch_norm: expected an (N, C) or (N, C, H, W) input, or (T, N, C, H, W) with a "
            f"leading task axis, got shape {x.shape}"
        )
    layout = BatchNormLayout(x.shape)
    t, _, c, _ = layout.kernel_shape
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is not None and tuple(stat.shape) != (c,):
            raise ValueError(
                f"batch_norm: {name} must have shape ({c},) for an input of shape {x.shape}, "
                f"got {tuple(stat.shape)}"
            )
    allowed = ((c,), (t, c)) if x.ndim == 5 else ((c,),)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and tuple(param.shape) not in allowed:
            raise ValueError(
                f"batch_norm: {name} must have shape "
                f"{' or '.join(map(str, allowed))} for an input of shape {x.shape}, "
                f"got {tuple(param.shape)}"
            )
    xp = get_array_module(x.data)
    if training:
        count = layout.count
        if count < 2:
            raise ValueError(
                f"batch_norm: training needs more than one value per channel, got input "
                f"shape {x.shape}"
            )
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(f"batch_norm: expected a float32 or float64 input, got {x.dtype}")

        def update_running(mean, inv_std):
            if running_mean is not None:
                _update_running(running_mean, mean.mean(axis=0), momentum)
            if running_var is not None:
                # The running estimate uses the unbiased variance (n / (n - 1)), as in PyTorch.
                var = inv_std**-2 - eps
                _update_running(running_var, (var * (count / (count - 1))).mean(axis=0), momentum)

        # Without an affine part the fused op gets constants: w = 1 and b = 0 need no gradient.
        if weight is None:
            weight = constant(xp.ones(c, dtype=x.dtype))
        if bias is None:
            bias = constant(xp.zeros(c, dtype=x.dtype))
        track = running_mean is not None or running_var is not None
        return batch_norm_train(x, weight, bias, eps, update_running if track else None)
    if running_mean is None or running_var is None:
        raise ValueError(
            "batch_norm: evaluation (training=False) needs running_mean and running_var"
        )
    shape = layout.param_shape((c,))
    rm = xp.asarray(_stat_array(running_mean)).reshape(shape)
    rv = xp.asarray(_stat_array(running_var)).reshape(shape)
    centred = x - constant(rm.astype(x.dtype, copy=False))
    inv_std = constant(((rv + eps) ** -0.5).astype(x.dtype, copy=False))
    # Fold the affine scale into the per-channel factor: one full-size product, not two.
    if weight is not None:
        inv_std = inv_std * reshape(weight, layout.param_shape(weight.shape))
    y = centred * inv_std
    return y if bias is None else y + reshape(bias, layout.param_shape(bias.shape))


# --- activations -------------------------------------------------------------------------------


def relu(x) -> Tensor:
    """y = max(x, 0);  gx = gy * [x > 0]  (the derivative at 0 is taken as 0)."""
    return _relu(x)


# --- losses ----------------------------------------------------------------------------------


def _reduce(loss: Tensor, reduction: str, op: str) -> Tensor:
    if reduction == "mean":
        return _mean(loss)
    if reduction == "sum":
        return _sum(loss)
    if reduction == "none":
        return loss
    raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _labels(labels, n: int, c: int, op: str, xp):
    """The labels as an int64 array of shape (n,), checked against c classes."""
    array = labels.data if isinstance(labels, Tensor) else labels
    if not hasattr(array, "dtype"):
        array = np.asarray(array)
    if array.dtype.kind not in "iu":
        raise TypeError(
            f"{op}: labels must be integer class indices, got dtype {array.dtype} "
            f"(shape {tuple(array.shape)}); convert with .astype(tm.int64)"
        )
    if tuple(array.shape) != (n,):
        raise ValueError(
            f"{op}: expected labels of shape ({n},) for input of shape ({n}, {c}), "
            f"got {tuple(array.shape)}"
        )
    if xp is np and not isinstance(array, np.ndarray):
        raise RuntimeError(
            f"{op}: labels are on {device_of(array)} but the input is on cpu; "
            "move them with .to('cpu')"
        )
    if n:
        if isinstance(array, np.ndarray):  # host labels: checked before any copy to a GPU
            low, high = int(array.min()), int(array.max())
        else:  # device labels: both bounds in one transfer (each one waits for the GPU)
            xp_labels = get_array_module(array)
            low, high = to_numpy(xp_labels.stack([array.min(), array.max()])).tolist()
        if low < 0 or high >= c:
            raise ValueError(
                f"{op}: labels must lie in [0, {c}) for {c} classes, got values in [{low}, {high}]"
            )
    return xp.asarray(array, dtype=np.int64)


def nll_loss(log_probs, labels, reduction: str = "mean") -> Tensor:
    """loss_n = -log_probs[n, labels_n], reduced by ``reduction`` ('mean', 'sum' or 'none')."""
    log_probs = as_input(log_probs, "nll_loss", "log_probs")
    if log_probs.ndim != 2:
        raise ValueError(
            f"nll_loss: expected (N, C) log-probabilities, got shape {log_probs.shape}"
        )
    n, c = log_probs.shape
    xp = get_array_module(log_probs.data)
    labels = _labels(labels, n, c, "nll_loss", xp)
    picked = Gather.apply(log_probs, index=xp.arange(n) * c + labels)
    return _reduce(-picked, reduction, "nll_loss")


def cross_entropy(logits, labels, reduction: str = "mean") -> Tensor:
    """loss_n = logsumexp(logits_n) - logits_n[labels_n] = -log softmax(logits_n)[labels_n].

    Computed from the logits with the max-shift (never log(softmax)): stable
    for large logits. ``logits`` is (N, C); ``labels`` are N integers in [0, C).
    Float32/float64 logits take one fused op (tinymeta.nn.softmax_xent: a kernel forward and
    backward, exact at every order); other dtypes go through log_softmax.
    """
    logits = as_input(logits, "cross_entropy", "logits")
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: expected (N, C) logits, got shape {logits.shape}")
    n, c = logits.shape
    xp = get_array_module(logits.data)
    labels = _labels(labels, n, c, "cross_entropy", xp)
    if logits.dtype in (np.float32, np.float64) and c > 0:
        return _reduce(softmax_cross_entropy(logits, labels), reduction, "cross_entropy")
    picked = Gather.apply(log_softmax(logits, axis=1), index=xp.arange(n) * c + labels)
    return _reduce(-picked, reduction, "cross_entropy")


def mse_loss(pred, target, reduction: str = "mean") -> Tensor:
    """loss = (pred - target)**2, reduced by ``reduction`` ('mean', 'sum' or 'none')."""
    pred = as_input(pred, "mse_loss", "pred")
    # (a tensor's shape without the .data property's bookkeeping nor np.shape's dispatch)
    target_shape = target.shape if isinstance(target, Tensor) else tuple(np.shape(target))
    if target_shape != pred.shape:
        raise ValueError(
            f"mse_loss: pred has shape {pred.shape} but target has shape {target_shape}; "
            "they must match (reshape one of them)"
        )
    diff = pred - target
    if reduction == "mean":
        return mean_square(diff)
    if reduction == "sum":
        return squared_sum(diff)
    return _reduce(diff * diff, reduction, "mse_loss")
