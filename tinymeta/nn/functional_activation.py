"""Activations and dropout as functions: ``F.erf``, ``F.gelu``, ``F.tanh``, ``F.sigmoid``,
``F.dropout``. Each is differentiable to any order (the rules compose differentiable ops)."""

from __future__ import annotations

import math

import numpy as np

from tinymeta import backend, creation, kernels
from tinymeta._checks import check_bool
from tinymeta.backend import get_array_module
from tinymeta.function import Function
from tinymeta.ops.elementwise import exp
from tinymeta.ops.elementwise import sigmoid as _sigmoid
from tinymeta.ops.elementwise import tanh as _tanh
from tinymeta.tensor import Tensor, as_input, constant

__all__ = ["dropout", "erf", "gelu", "sigmoid", "tanh"]

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _float(x: Tensor, op: str) -> Tensor:
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{op}: expected a float32 or float64 tensor, got {x.dtype} ({x.shape})")
    return x


class Erf(Function):
    """y = erf(x) = 2/sqrt(pi) int_0^x exp(-t^2) dt;  gx = gy * 2/sqrt(pi) * exp(-x^2)."""

    def forward(self, x):
        return kernels.erf(x)

    def backward(self, gy):
        (x,) = self.inputs
        return gy * (_TWO_OVER_SQRT_PI * exp(-(x * x)))


def erf(x) -> Tensor:
    """The error function, elementwise (float32 or float64)."""
    return Erf.apply(_float(as_input(x, "erf"), "erf"))


def gelu(x, approximate: str = "none") -> Tensor:
    """y = x * Phi(x) = x/2 * (1 + erf(x / sqrt(2))), PyTorch's default (exact) GELU;
    ``approximate="tanh"``: x/2 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x = _float(as_input(x, "gelu"), "gelu")
    if approximate == "none":
        return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))
        return 0.5 * x * (1.0 + _tanh(inner))
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def tanh(x) -> Tensor:
    """y = tanh(x)."""
    return _tanh(as_input(x, "tanh"))


def sigmoid(x) -> Tensor:
    """y = 1 / (1 + exp(-x))."""
    return _sigmoid(as_input(x, "sigmoid"))


def generator(rng) -> np.random.Generator | None:
    """``rng`` as a Generator: itself, one seeded by an int, or None (the global one, read
    at each use so that ``tm.manual_seed`` applies)."""
    if rng is None or isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(
        f"dropout: rng must be a numpy.random.Generator, an int seed or None, got {rng!r}"
    )


def _rng(rng) -> np.random.Generator:
    rng = generator(rng)
    return creation.default_rng() if rng is None else rng


def dropout(x, p: float = 0.5, training: bool = True, rng=None) -> Tensor:
    """y = x * mask / (1 - p) with mask ~ Bernoulli(1 - p) per element, in training; y = x
    otherwise. The mask is a constant (drawn from ``rng``, a ``numpy.random.Generator`` or a
    seed; default the generator seeded by ``tm.manual_seed``), so every order of derivative
    is that of a product with it. p = 1 gives zeros."""
    x = as_input(x, "dropout")
    if isinstance(p, bool) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"dropout: p must be a probability in [0, 1], got {p!r}")
    p = float(p)
    if not check_bool("training", training, "dropout") or p == 0.0:
        return x
    if x.dtype.kind != "f":
        raise TypeError(f"dropout: expected a floating tensor, got {x.dtype} ({x.shape})")
    if p == 1.0:
        return x * constant(get_array_module(x.data).zeros(x.shape, dtype=x.dtype))
    keep = _rng(rng).random(x.shape) >= p
    scale = (keep / (1.0 - p)).astype(x.dtype)
    return x * constant(backend.move_array(scale, backend.device_of(x.data)))
