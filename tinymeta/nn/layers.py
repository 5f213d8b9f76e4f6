"""Layers: Linear, Conv2d, MaxPool2d, BatchNorm1d/2d, ReLU, Flatten, Sequential.

Weights are initialised as in PyTorch: ``kaiming_uniform_(a=sqrt(5))``, which
is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and biases U(-1/sqrt(fan_in),
1/sqrt(fan_in)); BatchNorm's weight is 1 and its bias 0. Constructors take
``rng=`` (a ``numpy.random.Generator``; default: the generator seeded by
``tm.manual_seed``), ``dtype=`` (default float32) and ``device=``.
"""

from __future__ import annotations

import math

import numpy as np

from tinymeta import backend
from tinymeta._checks import check_bool, check_int, check_nonnegative, check_real
from tinymeta.nn import functional as F
from tinymeta.nn import init
from tinymeta.nn.conv import pair
from tinymeta.nn.inner_step import current_inner_step
from tinymeta.nn.module import Module, Parameter
from tinymeta.ops.shape import flatten
from tinymeta.tensor import DEFAULT_FLOAT, Tensor

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "Flatten",
    "Linear",
    "MaxPool2d",
    "ReLU",
    "Sequential",
]


def _empty(shape: tuple, dtype, device) -> Parameter:
    xp = backend.array_module_for(device or "cpu")
    return Parameter(xp.empty(shape, dtype=np.dtype(dtype) if dtype is not None else DEFAULT_FLOAT))


def _init_weight_and_bias(weight: Tensor, bias: Tensor | None, rng) -> None:
    """PyTorch's default: weight ~ kaiming_uniform_(a=sqrt(5)), bias ~ U(+-1/sqrt(fan_in))."""
    init.kaiming_uniform_(weight, a=math.sqrt(5), rng=rng)
    if bias is not None:
        fan_in, _ = init.calculate_fan_in_and_fan_out(weight)
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        init.uniform_(bias, -bound, bound, rng=rng)


class Linear(Module):
    """y = x @ weight^T + bias, weight of shape (out_features, in_features).

    Init: weight and bias ~ U(-1/sqrt(in_features), 1/sqrt(in_features)).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype=None,
        device=None,
        rng=None,
    ):
        super().__init__()
        self.in_features = check_int("in_features", in_features, "Linear")
        self.out_features = check_int("out_features", out_features, "Linear")
        bias = check_bool("bias", bias, "Linear")
        self.weight = _empty((self.out_features, self.in_features), dtype, device)
        self.register_parameter(
            "bias", _empty((self.out_features,), dtype, device) if bias else None
        )
        self.reset_parameters(rng)

    def reset_parameters(self, rng=None) -> None:
        _init_weight_and_bias(self.weight, self.bias, rng)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


class Conv2d(Module):
    """y = conv2d(x, weight, bias, stride, padding), weight (out, in, kh, kw), NCHW.

    Also takes x (T, N, C, H, W) with a leading task axis: under ``functional_call``
    with per-task weights (T, out, in, kh, kw) each task uses its own (see F.conv2d).

    Init: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in * kh * kw.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        dtype=None,
        device=None,
        rng=None,
    ):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, "Conv2d")
        self.out_channels = check_int("out_channels", out_channels, "Conv2d")
        bias = check_bool("bias", bias, "Conv2d")
        self.kernel_size = pair(kernel_size, "kernel_size", "Conv2d", low=1)
        self.stride = pair(stride, "stride", "Conv2d", low=1)
        self.padding = pair(padding, "padding", "Conv2d")
        shape = (self.out_channels, self.in_channels) + self.kernel_size
        self.weight = _empty(shape, dtype, device)
        self.register_parameter(
            "bias", _empty((self.out_channels,), dtype, device) if bias else None
        )
        self.reset_parameters(rng)

    def reset_parameters(self, rng=None) -> None:
        _init_weight_and_bias(self.weight, self.bias, rng)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.bias is None:
            s += ", bias=False"
        return s


class MaxPool2d(Module):
    """y = max over each kernel_size window, moved by stride (default: kernel_size).

    (N, C, H, W) or, with a leading task axis, (T, N, C, H, W) inputs.
    """

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        pair(kernel_size, "kernel_size", "MaxPool2d", low=1)  # checked now, used as given
        if stride is not None:
            pair(stride, "stride", "MaxPool2d", low=1)
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class _BatchNorm(Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias per channel, PyTorch's semantics.

    In training mode the batch statistics are used (gradients flow through
    them) and, with ``track_running_stats``, the running ones are updated:
    ``running = (1 - momentum) * running + momentum * batch`` (unbiased batch
    variance); ``momentum=None`` uses the cumulative average over
    ``num_batches_tracked`` batches. In eval mode the running statistics are
    used (the batch's, when they are not tracked). Init: weight 1, bias 0,
    running mean 0, running variance 1.

    ``per_step=R`` (MAML++'s per-step statistics) keeps R rows of running
    statistics, shape (R, C), and ``num_batches_tracked`` of shape (R,). Row k
    belongs to the network whose parameters have had k inner updates: a
    forward inside ``tinymeta.nn.inner_step(k)`` (which ``tinymeta.meta``'s
    inner loops set) reads and updates row min(k, R - 1), and a forward outside
    any inner loop uses the last row. For S inner steps use R = S + 1 (the
    query forward after the last update gets a row of its own).
    """

    expected_ndim = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        per_step: int | None = None,
        dtype=None,
        device=None,
    ):
        super().__init__()
        name = type(self).__name__
        self.num_features = check_int("num_features", num_features, name)
        self.eps = check_nonnegative("eps", eps, name)
        if momentum is not None:  # None: a cumulative average, as in PyTorch
            momentum = check_real("momentum", momentum, name, low=0.0, high=1.0)
        self.momentum = momentum
        affine = check_bool("affine", affine, name)
        track_running_stats = check_bool("track_running_stats", track_running_stats, name)
        self.affine, self.track_running_stats = affine, track_running_stats
        self.per_step = None if per_step is None else check_int("per_step", per_step, name)
        rows = () if per_step is None else (self.per_step,)
        c = self.num_features
        if affine:
            self.weight = init.ones_(_empty((c,), dtype, device))
            self.bias = init.zeros_(_empty((c,), dtype, device))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            xp = backend.array_module_for(device or "cpu")
            dt = np.dtype(dtype) if dtype is not None else DEFAULT_FLOAT
            self.register_buffer("running_mean", Tensor(xp.zeros(rows + (c,), dtype=dt)))
            self.register_buffer("running_var", Tensor(xp.ones(rows + (c,), dtype=dt)))
            self.register_buffer("num_batches_tracked", Tensor(xp.zeros(rows, dtype=np.int64)))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            init.zeros_(self.running_mean)
            init.ones_(self.running_var)
            self.num_batches_tracked.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim not in self.expected_ndim:
            raise ValueError(
                f"{type(self).__name__}: expected a {' or '.join(map(str, self.expected_ndim))}-D "
                f"input, got shape {x.shape}"
            )
        factor = 0.0 if self.momentum is None else self.momentum
        running_mean, running_var, tracked = self._statistics()
        if self.training and self.track_running_stats:
            tracked += 1  # an array: a counter, outside any graph
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(tracked)
        # Batch statistics in training, and in eval when no running ones are kept.
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            running_mean if keep else None,
            running_var if keep else None,
            self.weight,
            self.bias,
            training=use_batch,
            momentum=factor,
            eps=self.eps,
        )

    def _statistics(self) -> tuple:
        """(running_mean, running_var, num_batches_tracked) arrays for this forward: the whole
        buffers, or with ``per_step`` the row of the current inner step (views: updates land
        in the buffers). None for what is not tracked."""
        buffers = (self.running_mean, self.running_var, self.num_batches_tracked)
        if buffers[0] is None:
            return None, None, None
        if self.per_step is None:
            return tuple(b.data for b in buffers)
        step = current_inner_step()
        row = self.per_step - 1 if step is None else min(step, self.per_step - 1)
        return tuple(b.data[row, ...] for b in buffers)  # `...`: a 0-d view, not a scalar

    def extra_repr(self) -> str:
        per_step = "" if self.per_step is None else f", per_step={self.per_step}"
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}{per_step}"
        )


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of an (N, C) input over the batch axis."""

    expected_ndim = (2,)


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of an (N, C, H, W) input over N, H and W, per channel; of a
    (T, N, C, H, W) input (a leading task axis) per task and channel (see F.batch_norm)."""

    expected_ndim = (4, 5)


class ReLU(Module):
    """y = max(x, 0)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class Flatten(Module):
    """Merge axes start_dim..end_dim into one: (N, C, H, W) -> (N, C*H*W) by default.

    Negative dims count from the end. A net that must also run with a leading
    task axis (task-vectorized MAML: x of shape (T, N, C, H, W)) should use
    ``Flatten(-3)``, which merges the (C, H, W) image axes whatever leads them:
    (N, C*H*W) and (T, N, C*H*W). The default start_dim=1 follows PyTorch and
    would merge N into the features of a task-axis input.
    """

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim = check_int("start_dim", start_dim, "Flatten", low=None)
        self.end_dim = check_int("end_dim", end_dim, "Flatten", low=None)

    def forward(self, x: Tensor) -> Tensor:
        return flatten(x, self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class Sequential(Module):
    """Modules applied in order. Submodules are named "0", "1", ... (or by the keys of a
    dict passed as the only argument); indexing by int gives a module, by slice a Sequential."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], dict):
            for name, m in modules[0].items():
                self.add_module(name, m)
        else:
            for i, m in enumerate(modules):
                self.add_module(str(i), m)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, index):
        items = list(self._modules.items())
        if isinstance(index, slice):
            return Sequential(dict(items[index]))
        if not -len(items) <= index < len(items):
            raise IndexError(f"Sequential index {index} is out of range for {len(items)} modules")
        return items[index][1]

    def append(self, module: Module) -> Sequential:
        self.add_module(str(len(self._modules)), module)
        return self
