"""``MultiheadAttention`` with PyTorch's arguments, parameters and initialisation."""

from __future__ import annotations

from tinymeta._checks import check_bool
from tinymeta.nn import functional_attention as FT
from tinymeta.nn import init
from tinymeta.nn.layers import Linear, _empty
from tinymeta.nn.module import Module

__all__ = ["MultiheadAttention"]


class MultiheadAttention(Module):
    """Multi-head attention (see ``F.multi_head_attention``): parameters ``in_proj_weight``
    (3E, E) (the q, k, v projections stacked), ``in_proj_bias`` (3E,) and ``out_proj`` (a
    Linear(E, E)), so a PyTorch state dict loads as it is. Init as PyTorch: in_proj_weight
    Xavier-uniform, both biases 0, out_proj.weight as Linear's.

    Called as ``(query, key, value, attn_mask=None, need_weights=True,
    average_attn_weights=True)``; returns (output, weights averaged over heads or None).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        bias: bool = True,
        batch_first: bool = False,
        dtype=None,
        device=None,
        rng=None,
    ):
        super().__init__()
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        if self.embed_dim < 1 or self.num_heads < 1 or self.embed_dim % self.num_heads:
            raise ValueError(
                f"MultiheadAttention: embed_dim ({embed_dim}) must be a positive multiple of "
                f"num_heads ({num_heads})"
            )
        bias = check_bool("bias", bias, "MultiheadAttention")
        self.batch_first = check_bool("batch_first", batch_first, "MultiheadAttention")
        e = self.embed_dim
        self.in_proj_weight = _empty((3 * e, e), dtype, device)
        self.register_parameter("in_proj_bias", _empty((3 * e,), dtype, device) if bias else None)
        self.out_proj = Linear(e, e, bias=bias, dtype=dtype, device=device, rng=rng)
        self.reset_parameters(rng)

    def reset_parameters(self, rng=None) -> None:
        init.xavier_uniform_(self.in_proj_weight, rng=rng)
        if self.in_proj_bias is not None:
            init.zeros_(self.in_proj_bias)
            init.zeros_(self.out_proj.bias)

    def forward(
        self,
        query,
        key,
        value,
        attn_mask=None,
        need_weights: bool = True,
        average_attn_weights: bool = True,
    ):
        return FT.multi_head_attention(
            query,
            key,
            value,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.out_proj.weight,
            self.out_proj.bias,
            attn_mask=attn_mask,
            need_weights=need_weights,
            average_attn_weights=average_attn_weights,
            batch_first=self.batch_first,
        )

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"batch_first={self.batch_first}"
        )
