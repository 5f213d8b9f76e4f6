"""Matrix products: matmul (NumPy semantics, batched) and einsum."""

from __future__ import annotations

import string

from tinymeta import kernels
from tinymeta.function import Function, ViewFunction, arrays_only_on_host
from tinymeta.ops.reductions import sum as sum_axes
from tinymeta.ops.shape import broadcast_to, reshape, sum_to, swapaxes
from tinymeta.tensor import Tensor, constant


class MatMul(Function):
    """y = A @ B with A = a^T if trans_a else a, B likewise (at least 2-D; batch axes
    broadcast; ^T swaps the last two axes);  gA = gy @ B^T, gB = A^T @ gy, summed over
    broadcast batch axes and transposed back where an input was.

    The flags let a backward rule say "a^T @ gy" as one node instead of a Transpose and a
    MatMul: BLAS reads a transposed operand in place, so the flag costs nothing.
    """

    def __init__(self, trans_a: bool = False, trans_b: bool = False):
        self.trans_a, self.trans_b = trans_a, trans_b

    def forward(self, a, b):
        return _matmul_array(a, b, self.trans_a, self.trans_b)

    def backward(self, gy):
        a, b = self.inputs
        ta, tb = self.trans_a, self.trans_b
        ga = gb = None
        if self.needs_input_grad[0]:
            # gA = gy B^T; when a was transposed its gradient is gA^T = B gy^T.
            ga = _mm(b, gy, tb, True) if ta else _mm(gy, b, False, not tb)
            ga = sum_to(ga, a.shape)
        if self.needs_input_grad[1]:
            # gB = A^T gy; when b was transposed its gradient is gB^T = gy^T A.
            if tb:
                gb = _mm(gy, a, True, ta)
            elif b.ndim == 2 and not ta and _is_transposed(b._data):
                # b is W^T (x @ W.T): form (gy^T a)^T = a^T gy so that W's gradient comes
                # out laid out like W, saving a strided copy later.
                gb = _swapped(_mm(gy, a, True, False))
            else:
                gb = _mm(a, gy, not ta, False)
            gb = sum_to(gb, b.shape)
        return ga, gb


def _matmul_array(a, b, trans_a: bool, trans_b: bool):
    # The array's own swapaxes (NumPy and CuPy alike): xp.swapaxes adds a Python
    # wrapper and NumPy's __array_function__ dispatch (several times the view's cost).
    if trans_a:
        a = a.swapaxes(-1, -2)
    if trans_b:
        b = b.swapaxes(-1, -2)
    return kernels.matmul(a, b)  # NumPy: a @ b; CuPy: a kernel a CUDA graph can hold, or cuBLAS


def _mm(a, b, trans_a: bool, trans_b: bool):
    """MatMul.apply(a, b, ...); its array call alone where nothing would record (see
    function.arrays_only_on_host)."""
    if arrays_only_on_host(a, b):
        return Tensor._wrap(_matmul_array(a._data, b._data, trans_a, trans_b))
    return MatMul.apply(a, b, trans_a=trans_a, trans_b=trans_b)


def _swapped(x):
    """swapaxes(x, -1, -2), the view alone where nothing would record."""
    if arrays_only_on_host(x):
        return Tensor._wrap(x._data.swapaxes(-1, -2))
    return swapaxes(x, -1, -2)


def _is_transposed(array) -> bool:
    flags = array.flags
    return flags.f_contiguous and not flags.c_contiguous


def matmul(a, b):
    """NumPy's matmul: a 1-D operand is a row (left) or column (right) vector."""
    a = a if isinstance(a, Tensor) else Tensor(a)
    b = b if isinstance(b, Tensor) else Tensor(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(
            f"matmul: operands must be at least 1-D, got shapes {a.shape} and {b.shape}"
        )
    # Checked here so that the message names the shapes the caller passed (1-D operands
    # are reshaped to matrices below).
    k_b = b.shape[-2] if b.ndim >= 2 else b.shape[0]
    if a.shape[-1] != k_b:
        raise ValueError(
            f"matmul: shapes {a.shape} and {b.shape} do not line up: the last axis of a "
            f"({a.shape[-1]}) must equal the {'second-to-last' if b.ndim >= 2 else 'only'} "
            f"axis of b ({k_b})"
        )
    if a.ndim >= 2 and b.ndim >= 2:
        return MatMul.apply(a, b)
    a2 = reshape(a, (1,) + a.shape) if a.ndim == 1 else a
    b2 = reshape(b, b.shape + (1,)) if b.ndim == 1 else b
    y = MatMul.apply(a2, b2)
    # The vectors' axes of size 1 summed away, not reshaped: the result is an array of its
    # own rather than a view of an internal one, so it can be changed in place (h = W @ x;
    # h += b), which a view refuses. A sum over one term is exact.
    axes = ((y.ndim - 2,) if a.ndim == 1 else ()) + ((y.ndim - 1,) if b.ndim == 1 else ())
    return sum_axes(y, axes)


# --- einsum ---------------------------------------------------------------------------


def _parse_einsum(subscripts: str, ndims: list) -> tuple:
    """Explicit subscripts: ellipses spelled out as letters, implicit output made explicit."""
    subs = subscripts.replace(" ", "")
    inputs, _, output = subs.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(ndims):
        raise ValueError(f"einsum: {subscripts!r} names {len(terms)} operands, got {len(ndims)}")
    spare = [c for c in string.ascii_letters if c not in subs]
    n_ell = max((nd - (len(t) - 3) for t, nd in zip(terms, ndims) if "..." in t), default=0)
    ell = "".join(spare[:n_ell])
    terms = [
        t.replace("...", ell[n_ell - (nd - (len(t) - 3)) :]) if "..." in t else t
        for t, nd in zip(terms, ndims)
    ]
    if "->" in subs:
        output = output.replace("...", ell)
    else:  # NumPy's implicit mode: broadcast axes, then letters used once, sorted
        letters = "".join(terms)
        output = ell + "".join(
            sorted(c for c in set(letters) if letters.count(c) == 1 and c not in ell)
        )
    for t, nd in zip(terms, ndims):
        if len(t) != nd:
            raise ValueError(
                f"einsum: term {t!r} of {subscripts!r} does not fit an operand with {nd} dims"
            )
    return terms, output


class Einsum(ViewFunction):  # one operand: the result may be a view ('ij->ji')
    """y = einsum(terms -> out, *xs);  gx_k = einsum(out, other terms -> term_k, gy, *other xs),
    then broadcast over the letters of term_k that only x_k has (they were summed away), and
    for a repeated letter (a diagonal, as in 'ii->') put back on the diagonal."""

    def __init__(self, terms, output):
        self.terms, self.output_term = terms, output

    def forward(self, *xs):
        spec = ",".join(self.terms) + "->" + self.output_term
        return self.xp.einsum(spec, *xs, optimize=len(xs) > 1)

    def backward(self, gy):
        xs = self.inputs
        gxs = []
        for k, (x, term) in enumerate(zip(xs, self.terms)):
            if not self.needs_input_grad[k]:
                gxs.append(None)
                continue
            others = [t for i, t in enumerate(self.terms) if i != k]
            known = set(self.output_term).union(*others)
            letters = "".join(dict.fromkeys(term))  # the letters of term_k, each once
            kept = "".join(c for c in letters if c in known)
            operands = [gy] + [xs[i] for i in range(len(xs)) if i != k]
            gx = einsum(",".join([self.output_term] + others) + "->" + kept, *operands)
            if kept != letters:  # letters summed away in the forward come back by broadcasting
                size = dict(zip(term, x.shape))
                shape = tuple(gx.shape[kept.index(c)] if c in kept else 1 for c in letters)
                full = tuple(gx.shape[kept.index(c)] if c in kept else size[c] for c in letters)
                gx = broadcast_to(reshape(gx, shape), full)
            if letters != term:
                gx = self._on_diagonal(gx, letters, term)
            gxs.append(sum_to(gx, x.shape))
        return tuple(gxs)

    def _on_diagonal(self, gx, letters: str, term: str):
        """d x[..i..i..] = g[..i..] * eye[i, i']: repeat letters of ``term`` get fresh letters
        tied to the first by an identity matrix (a constant), so the result stays differentiable
        in ``gx``."""
        spare = iter(c for c in string.ascii_letters if c not in term)
        out, eyes = "", []
        for c in term:
            if c in out:
                fresh = next(spare)
                out += fresh
                n = gx.shape[letters.index(c)]
                eyes.append((c + fresh, constant(self.xp.eye(n, dtype=gx.dtype))))
            else:
                out += c
        spec = ",".join([letters] + [sub for sub, _ in eyes]) + "->" + out
        return einsum(spec, gx, *[eye for _, eye in eyes])


def einsum(subscripts: str, *operands):
    operands = [t if isinstance(t, Tensor) else Tensor(t) for t in operands]
    terms, output = _parse_einsum(subscripts, [t.ndim for t in operands])
    return Einsum.apply(*operands, terms=terms, output=output)
