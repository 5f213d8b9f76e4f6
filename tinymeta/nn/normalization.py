"""``LayerNorm`` (PyTorch's): normalisation over the trailing axes of each example."""

from __future__ import annotations

from tinymeta._checks import check_bool, check_nonnegative
from tinymeta.nn import functional_attention as FT
from tinymeta.nn import init
from tinymeta.nn.layers import _empty
from tinymeta.nn.module import Module
from tinymeta.tensor import Tensor

__all__ = ["LayerNorm"]


class LayerNorm(Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the trailing ``normalized_shape``
    axes (biased variance). Init: weight 1, bias 0 (``elementwise_affine=False``: none).
    Per-task weight and bias (T, *normalized_shape) under ``functional_call`` take an input
    with a leading task axis."""

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.normalized_shape = FT._normalized_shape(normalized_shape)
        if not self.normalized_shape or min(self.normalized_shape) < 1:
            raise ValueError(
                f"LayerNorm: normalized_shape must be positive sizes, got {normalized_shape!r}"
            )
        self.eps = check_nonnegative("eps", eps, "LayerNorm")
        self.elementwise_affine = check_bool("elementwise_affine", elementwise_affine, "LayerNorm")
        bias = check_bool("bias", bias, "LayerNorm")
        shape = self.normalized_shape
        weight = init.ones_(_empty(shape, dtype, device)) if self.elementwise_affine else None
        self.register_parameter("weight", weight)
        has_bias = self.elementwise_affine and bias
        self.register_parameter(
            "bias", init.zeros_(_empty(shape, dtype, device)) if has_bias else None
        )

    def forward(self, x: Tensor) -> Tensor:
        return FT.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )
