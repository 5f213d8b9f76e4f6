"""Hypothesis strategies for property tests of code built on tinymeta.

Shapes (including 0-d, size-1 axes and rank differences), sets of shapes that
broadcast together, well-conditioned arrays (finite, bounded, optionally kept
away from zero or from kinks such as the corners of ``abs``/``relu``/``clip``),
and tensors, optionally as non-contiguous views of a bigger array.

Hypothesis is a test dependency: this module is the only part of tinymeta that
imports it, and ``tinymeta.testing.strategies`` is loaded on first use.

Example::

    import numpy as np
    from hypothesis import given, strategies as st

    import tinymeta as tm
    from tinymeta.testing import check_grads
    from tinymeta.testing import strategies as tms


    @given(st.data())
    def test_my_op(data):
        sa, sb = data.draw(tms.broadcastable_shapes(n=2))
        a = data.draw(tms.tensors(sa, requires_grad=True))
        b = data.draw(tms.tensors(sb, elements=tms.well_conditioned(min_magnitude=0.5)))
        y = a / b
        np.testing.assert_allclose(y.numpy(), a.numpy() / b.numpy())
        check_grads(lambda a, b: a / b, [a, b], order=2)
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinymeta.tensor import Tensor

__all__ = [
    "arrays",
    "as_noncontiguous",
    "broadcastable_shapes",
    "distinct_arrays",
    "float_dtypes",
    "shapes",
    "tensors",
    "well_conditioned",
]


def shapes(
    min_dims: int = 0, max_dims: int = 4, min_side: int = 1, max_side: int = 5
) -> st.SearchStrategy[tuple]:
    """Array shapes: tuples of ``min_dims..max_dims`` sides in ``min_side..max_side``.

    With the defaults this includes the 0-d shape ``()`` and shapes with
    size-1 axes such as ``(1, 3, 1)``.
    """
    return hnp.array_shapes(
        min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side
    )


def broadcastable_shapes(
    n: int = 2, min_dims: int = 0, max_dims: int = 4, min_side: int = 1, max_side: int = 5
) -> st.SearchStrategy[tuple]:
    """A tuple of ``n`` shapes that broadcast together (``np.broadcast_shapes(*shapes)`` works).

    The shapes can differ in rank (one may be 0-d) and have size-1 axes that
    stretch against the others: ``((3, 1), (2, 1, 4))``, ``((), (5,))``, ...
    """
    return hnp.mutually_broadcastable_shapes(
        num_shapes=n, min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side
    ).map(lambda b: tuple(b.input_shapes))


def float_dtypes() -> st.SearchStrategy[np.dtype]:
    """``float32`` or ``float64``."""
    return st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)])


def well_conditioned(
    bound: float = 3.0,
    min_magnitude: float = 0.0,
    positive: bool = False,
    avoid: tuple = (),
    margin: float = 0.05,
) -> st.SearchStrategy[float]:
    """Finite floats with ``|x| <= bound``, suited to finite-difference checks.

    ``min_magnitude``: keep ``|x| >= min_magnitude`` (away from 0, e.g. a
    divisor). ``positive``: only ``x > 0`` (log, sqrt, a base of ``**``);
    combine it with ``min_magnitude`` to stay away from the singularity.
    ``avoid``: points (kinks such as the bounds of ``clip``) to stay at least
    ``margin`` away from. Subnormals, NaN and infinities are never produced.
    """
    if not 0 <= min_magnitude <= bound:
        raise ValueError(f"well_conditioned: need 0 <= min_magnitude <= bound, got {min_magnitude}")
    magnitude = st.floats(
        min_value=min_magnitude,
        max_value=bound,
        exclude_min=positive and min_magnitude == 0,
        allow_nan=False,
        allow_infinity=False,
        allow_subnormal=False,
    )
    if positive:
        values = magnitude
    elif min_magnitude > 0:
        values = st.tuples(st.booleans(), magnitude).map(lambda t: -t[1] if t[0] else t[1])
    else:
        values = st.floats(
            min_value=-bound,
            max_value=bound,
            allow_nan=False,
            allow_infinity=False,
            allow_subnormal=False,
        )
    if avoid:
        points = tuple(float(p) for p in avoid)
        values = values.filter(lambda v: all(abs(v - p) >= margin for p in points))
    return values


def _shape_strategy(shape) -> st.SearchStrategy[tuple]:
    if isinstance(shape, st.SearchStrategy):
        return shape
    return st.just(tuple(shape))


def arrays(
    shape,
    dtype=np.float64,
    elements: st.SearchStrategy[float] | None = None,
    unique: bool = False,
) -> st.SearchStrategy[np.ndarray]:
    """C-contiguous NumPy arrays of ``shape`` (a tuple or a strategy of shapes).

    ``elements`` defaults to ``well_conditioned()``: finite, ``|x| <= 3``.
    Values are drawn in float64 and then cast to ``dtype`` (so a bound such as
    0.3 need not be exactly representable in float32); with ``unique=True``
    they are distinct in float64, which a cast to float32 may not preserve.
    """
    dtype = np.dtype(dtype)
    elements = well_conditioned() if elements is None else elements
    base = hnp.arrays(np.float64, _shape_strategy(shape), elements=elements, unique=unique)
    return base.map(lambda a: np.ascontiguousarray(a, dtype=dtype))


def distinct_arrays(
    shape, dtype=np.float64, spacing: float = 0.1, bound: float = 4.0
) -> st.SearchStrategy[np.ndarray]:
    """Arrays whose elements are pairwise at least ``spacing`` apart (no ties).

    What ``max``/``min``/``maximum`` need for a finite-difference check: the
    arg-max does not change within a small step. Elements are multiples of
    ``spacing`` in ``[-bound, bound]`` (the range grows if the array is too big
    to fit in it).
    """
    dtype = np.dtype(dtype)

    def for_shape(s):
        k = max(int(bound / spacing), math.prod(s))
        ints = hnp.arrays(np.int64, s, elements=st.integers(-k, k), unique=True)
        return ints.map(lambda a: (a * spacing).astype(dtype))

    return _shape_strategy(shape).flatmap(for_shape)


def as_noncontiguous(array: np.ndarray, how: str = "stride", fill=np.nan) -> np.ndarray:
    """A non-contiguous view holding the values of ``array``.

    ``how="stride"`` takes every other element of a bigger array along the
    last axis with more than one element; ``"reverse"`` does the same with a
    negative step; ``"transpose"`` is a transposed view of a C-contiguous
    array (this needs two axes with more than one element, otherwise
    ``"stride"`` is used). The rest of the bigger array is set to ``fill``
    (NaN by default), so that code ignoring the strides shows it.

    NumPy counts an array of fewer than two elements as contiguous whatever
    its strides: such an array is returned as a (contiguous) copy.
    """
    array = np.asarray(array)
    if array.size < 2:
        return array.copy()
    big_axes = [i for i, n in enumerate(array.shape) if n > 1]
    if how == "transpose" and len(big_axes) >= 2:
        # Swap the first and last big axes: the result is F-ordered on them.
        i, j = big_axes[0], big_axes[-1]
        perm = list(range(array.ndim))
        perm[i], perm[j] = perm[j], perm[i]
        base = np.ascontiguousarray(np.transpose(array, perm))
        view = np.transpose(base, perm)
    elif how in ("stride", "reverse", "transpose"):
        axis = big_axes[-1]
        big_shape = list(array.shape)
        big_shape[axis] *= 2
        base = np.full(big_shape, fill, dtype=array.dtype)
        index = [slice(None)] * array.ndim
        index[axis] = slice(None, None, -2) if how == "reverse" else slice(None, None, 2)
        view = base[tuple(index)]
        view[...] = array
    else:
        raise ValueError(f"as_noncontiguous: unknown how={how!r}")
    assert not view.flags.c_contiguous, (array.shape, how)
    return view


def tensors(
    shape=None,
    dtype=np.float64,
    requires_grad: bool = False,
    noncontiguous: bool = False,
    elements: st.SearchStrategy[float] | None = None,
) -> st.SearchStrategy[Tensor]:
    """Tensors of ``shape`` (a tuple or a strategy; default ``shapes()``).

    ``elements`` as for ``arrays``. ``requires_grad`` makes float leaves
    that require grad. ``noncontiguous=True`` gives a tensor whose data is a
    strided, reversed or transposed view of a bigger array (see
    ``as_noncontiguous``); shapes with fewer than two elements, which NumPy
    always counts as contiguous, are then not generated.
    """
    shape_st = shapes() if shape is None else _shape_strategy(shape)
    if noncontiguous:
        shape_st = shape_st.filter(lambda s: math.prod(s) >= 2)
    values = arrays(shape_st, dtype=dtype, elements=elements)
    if noncontiguous:
        hows = st.sampled_from(["stride", "reverse", "transpose"])
        values = st.tuples(values, hows).map(lambda t: as_noncontiguous(t[0], t[1]))
    return values.map(lambda a: Tensor(a, requires_grad=requires_grad))
