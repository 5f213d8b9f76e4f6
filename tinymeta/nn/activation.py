"""Activation and dropout layers: ``Tanh``, ``Sigmoid``, ``GELU``, ``Dropout`` (PyTorch's)."""

from __future__ import annotations

from tinymeta.nn import functional_activation as FA
from tinymeta.nn.module import Module
from tinymeta.tensor import Tensor

__all__ = ["GELU", "Dropout", "Sigmoid", "Tanh"]


class Tanh(Module):
    """y = tanh(x)."""

    def forward(self, x: Tensor) -> Tensor:
        return FA.tanh(x)


class Sigmoid(Module):
    """y = 1 / (1 + exp(-x))."""

    def forward(self, x: Tensor) -> Tensor:
        return FA.sigmoid(x)


class GELU(Module):
    """y = x * Phi(x) = x/2 (1 + erf(x / sqrt(2))) (``approximate="tanh"``: the tanh form)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return FA.gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return "" if self.approximate == "none" else f"approximate={self.approximate!r}"


class Dropout(Module):
    """y = x * mask / (1 - p), mask ~ Bernoulli(1 - p), in training mode; y = x in eval().

    ``rng``: a ``numpy.random.Generator`` (or a seed for one) that draws the masks; by default
    the generator seeded by ``tm.manual_seed``. Either way a seeded run repeats its masks.
    """

    def __init__(self, p: float = 0.5, rng=None):
        super().__init__()
        if isinstance(p, bool) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"Dropout: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)
        self.rng = FA.generator(rng)

    def forward(self, x: Tensor) -> Tensor:
        return FA.dropout(x, self.p, self.training, self.rng)

    def extra_repr(self) -> str:
        return f"p={self.p}"
