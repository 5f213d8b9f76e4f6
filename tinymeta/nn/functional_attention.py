"""Layer normalisation, embeddings and multi-head attention as functions: ``F.layer_norm``,
``F.embedding``, ``F.multi_head_attention``. Composed of differentiable ops, so every order of
derivative is available. Layouts and semantics follow PyTorch.

Task axis (``functional_call`` with per-task parameters): a weight with one more leading axis
than the layer's own, (T, ...), pairs with an input whose first axis is that task axis.
"""

from __future__ import annotations

import math

import numpy as np

from tinymeta._checks import check_bool
from tinymeta.backend import get_array_module
from tinymeta.nn.functional_linear import linear
from tinymeta.ops.elementwise import sqrt
from tinymeta.ops.linalg import matmul
from tinymeta.ops.reductions import mean
from tinymeta.ops.selection import where
from tinymeta.ops.shape import broadcast_to, expand_dims, getitem, reshape, swapaxes
from tinymeta.ops.softmax import softmax
from tinymeta.tensor import Tensor, as_input, constant

__all__ = ["embedding", "layer_norm", "multi_head_attention"]


# --- layer normalisation --------------------------------------------------------------------


def _normalized_shape(shape) -> tuple:
    return (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias, with the mean and (biased) variance
    over the trailing ``normalized_shape`` axes of x; weight and bias of that shape, or
    (T, *normalized_shape) per task for an x whose first axis is the task axis."""
    op = "layer_norm"
    x = as_input(x, op, "input")
    shape = _normalized_shape(normalized_shape)
    k = len(shape)
    if k == 0 or x.ndim < k or x.shape[x.ndim - k :] != shape:
        raise ValueError(
            f"{op}: the input's trailing axes {x.shape} must be normalized_shape {shape}"
        )
    axes = tuple(range(x.ndim - k, x.ndim))
    centred = x - mean(x, axes, keepdims=True)
    y = centred / sqrt(mean(centred * centred, axes, keepdims=True) + eps)
    if weight is not None:
        y = y * _affine(op, "weight", as_input(weight, op, "weight"), x, shape)
    if bias is not None:
        y = y + _affine(op, "bias", as_input(bias, op, "bias"), x, shape)
    return y


def _affine(op: str, name: str, p: Tensor, x: Tensor, shape: tuple) -> Tensor:
    """p (shape) as it is, or p (T, *shape) reshaped to broadcast against x (T, ..., *shape)."""
    if p.shape == shape:
        return p
    if p.shape[1:] != shape or x.ndim <= len(shape) or p.shape[0] != x.shape[0]:
        raise ValueError(
            f"{op}: {name} must have shape {shape}, or (T, *{shape}) with an input whose first "
            f"axis has the T tasks; got {p.shape} for an input of shape {x.shape}"
        )
    return reshape(p, (p.shape[0],) + (1,) * (x.ndim - 1 - len(shape)) + shape)


# --- embedding ------------------------------------------------------------------------------


def embedding(indices, weight, padding_idx: int | None = None) -> Tensor:
    """y[...] = weight[indices[...]]: rows of weight (V, D) picked by integer indices of any
    shape; y has shape indices.shape + (D,). The gradient adds up the rows' gradients
    (repeated indices accumulate). Row ``padding_idx`` gets no gradient, as in PyTorch.

    Per task: weight (T, V, D) with indices (T, ...) picks task t's rows for indices[t].
    """
    op = "embedding"
    weight = as_input(weight, op, "weight")
    idx = indices.data if isinstance(indices, Tensor) else indices
    xp = get_array_module(weight.data)
    idx = xp.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"{op}: indices must be integers, got dtype {idx.dtype} ({idx.shape})")
    if weight.ndim not in (2, 3):
        raise ValueError(f"{op}: weight must be (V, D), or (T, V, D) per task, got {weight.shape}")
    v = weight.shape[-2]
    if idx.size and (int(idx.min()) < -v or int(idx.max()) >= v):
        raise IndexError(
            f"{op}: indices must lie in [0, {v}) for a weight of shape {weight.shape}, got "
            f"values in [{int(idx.min())}, {int(idx.max())}]"
        )
    idx = idx % v  # negative indices count from the end, as NumPy's
    if weight.ndim == 2:
        index = idx
    else:
        if idx.ndim < 1 or idx.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{op}: per-task weights {weight.shape} need indices (T, ...) with "
                f"T = {weight.shape[0]}, got shape {idx.shape}"
            )
        tasks = xp.arange(weight.shape[0]).reshape((-1,) + (1,) * (idx.ndim - 1))
        index = (tasks, idx)
    y = getitem(weight, index)
    if padding_idx is None:
        return y
    pad = (idx == padding_idx % v)[..., None]
    # The padding rows' values, as constants: the same output, no gradient to that row.
    return where(pad, constant(y.data), y)


# --- multi-head attention -------------------------------------------------------------------


def _project(x: Tensor, w: Tensor, b) -> Tensor:
    """x @ w^T + b over x's last axis; per-task w (T, out, in) or b (T, out) with x (T, ..., in)
    (a shared one of the pair is broadcast over the tasks)."""
    if w.ndim == 2 and (b is None or b.ndim == 1):
        return linear(x, w, b)
    t = x.shape[0]
    if w.ndim == 2:
        w = broadcast_to(expand_dims(w, 0), (t,) + w.shape)
    if b is not None and b.ndim == 1:
        b = broadcast_to(expand_dims(b, 0), (t,) + b.shape)
    flat = reshape(x, (t, -1, x.shape[-1]))  # (T, ..., in) as (T, M, in)
    return reshape(linear(flat, w, b), x.shape[:-1] + (w.shape[-2],))


def _rows(t, start: int, stop: int):
    """Rows start:stop of a weight (..., R, C) or bias (..., R)."""
    return None if t is None else getitem(t, (Ellipsis, slice(start, stop), slice(None)))


def _bias_rows(b, start: int, stop: int):
    return None if b is None else getitem(b, (Ellipsis, slice(start, stop)))


def _float_mask(op: str, mask, dtype, xp, n: int, heads: int, length: int, source: int):
    """attn_mask as an additive float array broadcasting against (..., N, heads, L, S)."""
    m = mask.data if isinstance(mask, Tensor) else mask
    m = xp.asarray(m)
    if m.shape == (length, source):
        pass
    elif m.shape == (n * heads, length, source):
        m = m.reshape(n, heads, length, source)
    else:
        raise ValueError(
            f"{op}: attn_mask must have shape ({length}, {source}) or "
            f"({n * heads}, {length}, {source}) (batch * num_heads, L, S), got {m.shape}"
        )
    if m.dtype == bool:  # True: this position may not be attended to
        return xp.where(m, -np.inf, 0.0).astype(dtype)
    if m.dtype.kind != "f":
        raise TypeError(f"{op}: attn_mask must be bool or float, got {m.dtype}")
    return m.astype(dtype, copy=False)


def multi_head_attention(
    query,
    key,
    value,
    num_heads: int,
    in_proj_weight,
    in_proj_bias,
    out_proj_weight,
    out_proj_bias,
    attn_mask=None,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    batch_first: bool = False,
) -> tuple:
    """PyTorch's multi-head attention: q, k, v = the rows [0:E], [E:2E], [2E:3E] of
    in_proj_weight (3E, E) applied to query, key, value; per head (E / num_heads features)
    softmax(q k^T / sqrt(E / num_heads) + mask) v; the heads concatenated and projected by
    out_proj (E, E). Returns (output, weights): output like query; weights (N, L, S), the
    attention averaged over the heads (per head (N, heads, L, S) with
    ``average_attn_weights=False``), or None without ``need_weights``.

    query (L, N, E), key and value (S, N, E) ((N, L, E) with ``batch_first``; (L, E) for one
    unbatched sequence; a leading task axis (T, ...) with per-task weights (T, 3E, E)).
    attn_mask (L, S) or (N * num_heads, L, S): bool (True = not allowed) or float (added).
    """
    op = "multi_head_attention"
    need_weights = check_bool("need_weights", need_weights, op)
    average_attn_weights = check_bool("average_attn_weights", average_attn_weights, op)
    batch_first = check_bool("batch_first", batch_first, op)
    q, k, v = (as_input(t, op, n) for t, n in ((query, "query"), (key, "key"), (value, "value")))
    w_in = as_input(in_proj_weight, op, "in_proj_weight")
    w_out = as_input(out_proj_weight, op, "out_proj_weight")
    b_in = None if in_proj_bias is None else as_input(in_proj_bias, op, "in_proj_bias")
    b_out = None if out_proj_bias is None else as_input(out_proj_bias, op, "out_proj_bias")
    e = w_in.shape[-1]
    tasks = w_in.ndim == 3 or w_out.ndim == 3
    if w_in.shape[-2:] != (3 * e, e) or w_out.shape[-2:] != (e, e):
        raise ValueError(
            f"{op}: in_proj_weight must be (3E, E) and out_proj_weight (E, E), got "
            f"{w_in.shape} and {w_out.shape}"
        )
    if num_heads < 1 or e % num_heads:
        raise ValueError(f"{op}: embed_dim {e} must be divisible by num_heads {num_heads}")
    batched = 3 + tasks
    unbatched = q.ndim == batched - 1
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.ndim != q.ndim or t.ndim not in (batched - 1, batched) or t.shape[-1] != e:
            raise ValueError(
                f"{op}: expected {name} of shape ({'T, ' if tasks else ''}L, N, {e}) "
                f"(or without N, unbatched), got {t.shape} (query {q.shape})"
            )
    if unbatched:  # one sequence: a batch of one
        q, k, v = (reshape(t, t.shape[:-2] + (1,) + t.shape[-2:]) for t in (q, k, v))
    elif not batch_first:  # (..., L, N, E) -> (..., N, L, E)
        q, k, v = (swapaxes(t, -3, -2) for t in (q, k, v))
    if k.shape != v.shape or k.shape[:-2] != q.shape[:-2]:
        raise ValueError(
            f"{op}: key and value must have one shape with query's batch, got query "
            f"{q.shape}, key {k.shape}, value {v.shape} (batch-first)"
        )
    n, length, source = q.shape[-3], q.shape[-2], k.shape[-2]
    head = e // num_heads

    def heads(x, rows):  # (..., N, L, E) projected, as (..., N, heads, L, head)
        p = _project(x, _rows(w_in, *rows), _bias_rows(b_in, *rows))
        p = reshape(p, p.shape[:-1] + (num_heads, head))
        return swapaxes(p, -3, -2)

    qh = heads(q, (0, e)) * (1.0 / math.sqrt(head))  # scaled first, as PyTorch does
    kh, vh = heads(k, (e, 2 * e)), heads(v, (2 * e, 3 * e))
    scores = matmul(qh, swapaxes(kh, -1, -2))  # (..., N, heads, L, S)
    if attn_mask is not None:
        xp = get_array_module(scores.data)
        mask = _float_mask(op, attn_mask, scores.dtype, xp, n, num_heads, length, source)
        scores = scores + constant(mask)
    attn = softmax(scores, axis=-1)
    out = swapaxes(matmul(attn, vh), -3, -2)  # (..., N, L, heads, head)
    out = _project(reshape(out, out.shape[:-2] + (e,)), w_out, b_out)
    weights = None
    if need_weights:
        weights = mean(attn, axis=-3) if average_attn_weights else attn
    if unbatched:
        out = reshape(out, out.shape[:-3] + out.shape[-2:])
        if weights is not None:  # drop the batch axis of one: (..., 1, [heads,] L, S)
            axis = weights.ndim - (3 if average_attn_weights else 4)
            weights = reshape(weights, weights.shape[:axis] + weights.shape[axis + 1 :])
    elif not batch_first:
        out = swapaxes(out, -3, -2)
    return out, weights
