"""Parameter initialisation, in place, with PyTorch's formulas.

Every function fills a tensor in place (outside the graph) and returns it.
Random ones take ``rng=`` (a ``numpy.random.Generator``); without it they use
the global generator that ``tm.manual_seed`` seeds. Values are drawn on the
host in float64, then cast and moved to the tensor's dtype and device, so a
seed gives the same numbers on every device.
"""

from __future__ import annotations

import math

import numpy as np

from tinymeta import backend, creation
from tinymeta.grad_mode import no_grad
from tinymeta.tensor import Tensor

__all__ = [
    "calculate_fan_in_and_fan_out",
    "calculate_gain",
    "constant_",
    "kaiming_normal_",
    "kaiming_uniform_",
    "normal_",
    "ones_",
    "uniform_",
    "xavier_normal_",
    "xavier_uniform_",
    "zeros_",
]


def _rng(rng) -> np.random.Generator:
    # Looked up at call time: tm.manual_seed replaces the global generator.
    return rng if rng is not None else creation.default_rng()


def _fill(tensor: Tensor, values) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"init: expected a Tensor, got {type(tensor).__name__}")
    values = np.asarray(values, dtype=tensor.dtype)
    with no_grad():
        tensor.copy_(backend.move_array(values, tensor.device))
    return tensor


def calculate_fan_in_and_fan_out(tensor: Tensor) -> tuple[int, int]:
    """fan_in = in * receptive field, fan_out = out * receptive field, for a weight of shape
    (out, in, *kernel). Needs at least 2 dimensions."""
    if tensor.ndim < 2:
        raise ValueError(
            f"calculate_fan_in_and_fan_out: needs a tensor with at least 2 dimensions, "
            f"got shape {tensor.shape}"
        )
    receptive = int(np.prod(tensor.shape[2:])) if tensor.ndim > 2 else 1
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended std gain of a nonlinearity (PyTorch's table): relu sqrt(2),
    leaky_relu sqrt(2 / (1 + slope**2)), tanh 5/3, linear/conv/sigmoid 1."""
    if nonlinearity in ("linear", "conv1d", "conv2d", "conv3d", "sigmoid", "identity"):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"calculate_gain: unsupported nonlinearity {nonlinearity!r}")


def _fan(tensor: Tensor, mode: str) -> int:
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def uniform_(tensor: Tensor, a: float = 0.0, b: float = 1.0, rng=None) -> Tensor:
    """tensor ~ U(a, b)."""
    return _fill(tensor, _rng(rng).uniform(a, b, tensor.shape))


def normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0, rng=None) -> Tensor:
    """tensor ~ N(mean, std**2)."""
    return _fill(tensor, _rng(rng).normal(mean, std, tensor.shape))


def constant_(tensor: Tensor, val: float) -> Tensor:
    """tensor = val everywhere."""
    return _fill(tensor, np.full(tensor.shape, val))


def zeros_(tensor: Tensor) -> Tensor:
    """tensor = 0."""
    return constant_(tensor, 0.0)


def ones_(tensor: Tensor) -> Tensor:
    """tensor = 1."""
    return constant_(tensor, 1.0)


def kaiming_uniform_(
    tensor: Tensor,
    a: float = 0.0,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
    rng=None,
) -> Tensor:
    """tensor ~ U(-bound, bound), bound = gain * sqrt(3 / fan)  (He et al., 2015).

    With PyTorch's layer default ``a=sqrt(5)`` the gain is sqrt(1/3), so
    bound = 1 / sqrt(fan_in).
    """
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / _fan(tensor, mode))
    return uniform_(tensor, -bound, bound, rng=rng)


def kaiming_normal_(
    tensor: Tensor,
    a: float = 0.0,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
    rng=None,
) -> Tensor:
    """tensor ~ N(0, std**2), std = gain / sqrt(fan)."""
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))
    return normal_(tensor, 0.0, std, rng=rng)


def xavier_uniform_(tensor: Tensor, gain: float = 1.0, rng=None) -> Tensor:
    """tensor ~ U(-bound, bound), bound = gain * sqrt(6 / (fan_in + fan_out))  (Glorot, 2010)."""
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -bound, bound, rng=rng)


def xavier_normal_(tensor: Tensor, gain: float = 1.0, rng=None) -> Tensor:
    """tensor ~ N(0, std**2), std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), rng=rng)
