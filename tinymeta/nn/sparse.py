"""``Embedding`` (PyTorch's): a table of vectors looked up by integer index."""

from __future__ import annotations

from tinymeta.grad_mode import no_grad
from tinymeta.nn import functional_attention as FT
from tinymeta.nn import init
from tinymeta.nn.layers import _empty
from tinymeta.nn.module import Module
from tinymeta.tensor import Tensor

__all__ = ["Embedding"]


class Embedding(Module):
    """y = weight[indices], weight (num_embeddings, embedding_dim) ~ N(0, 1) (the row
    ``padding_idx``, if given, is zero and gets no gradient). Per-task weights (T, V, D)
    under ``functional_call`` take indices (T, ...)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        dtype=None,
        device=None,
        rng=None,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        if self.num_embeddings < 1 or self.embedding_dim < 1:
            raise ValueError(
                f"Embedding: num_embeddings and embedding_dim must be positive, got "
                f"{num_embeddings} and {embedding_dim}"
            )
        if padding_idx is not None:
            if not -self.num_embeddings <= padding_idx < self.num_embeddings:
                raise ValueError(
                    f"Embedding: padding_idx must lie in [-{self.num_embeddings}, "
                    f"{self.num_embeddings}), got {padding_idx}"
                )
            padding_idx %= self.num_embeddings
        self.padding_idx = padding_idx
        self.weight = _empty((self.num_embeddings, self.embedding_dim), dtype, device)
        self.reset_parameters(rng)

    def reset_parameters(self, rng=None) -> None:
        init.normal_(self.weight, rng=rng)
        if self.padding_idx is not None:
            with no_grad():
                self.weight.data[self.padding_idx] = 0

    def forward(self, indices) -> Tensor:
        return FT.embedding(indices, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}"
