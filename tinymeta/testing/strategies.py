"""Hypothesis strategies for property tests of code built on tinymeta.

Shapes (including 0-d, size-1 axes and rank differences), sets of shapes that
broadcast together, well-conditioned arrays (finite, bounded, optionally kept
away from zero or from kinks such as the corners of ``abs``/``relu``/``clip``),
and tensors, optionally as non-contiguous views of a bigger array.

For meta-learning: meta-batches of tasks (``sinusoid_task_batches``,
``classification_task_batches`` with shuffled N-way K-shot ``episode_labels``),
small float64 networks (``mlp_params``/``mlp_forward``,
``conv_params``/``conv_forward``) and inner-loop configurations
(``inner_loop_configs``), for properties such as "the meta-gradient equals
finite differences" (``tinymeta.testing.check_meta_grads``).

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
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinymeta.tensor import Tensor

__all__ = [
    "InnerLoopConfig",
    "TaskBatch",
    "arrays",
    "as_noncontiguous",
    "broadcastable_shapes",
    "classification_task_batches",
    "conv_forward",
    "conv_params",
    "distinct_arrays",
    "episode_labels",
    "float_dtypes",
    "inner_loop_configs",
    "mlp_forward",
    "mlp_params",
    "shapes",
    "sinusoid_task_batches",
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


# --- meta-learning: task batches, small networks, inner-loop configurations -----------------


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch: support ``(xs, ys)`` and query ``(xq, yq)`` tensors with a leading task axis.

    What ``tinymeta.meta.maml_loss`` takes: ``maml_loss(forward, params,
    batch.support, batch.query, ...)``. ``select(order)`` keeps (and reorders)
    some tasks, ``task(t)`` is a batch of task ``t`` alone.
    """

    xs: Tensor
    ys: Tensor
    xq: Tensor
    yq: Tensor

    @property
    def support(self) -> tuple:
        return self.xs, self.ys

    @property
    def query(self) -> tuple:
        return self.xq, self.yq

    @property
    def num_tasks(self) -> int:
        return self.xs.shape[0]

    def select(self, order) -> TaskBatch:
        """The tasks ``order`` (a sequence of task indices), in that order."""
        index = np.asarray(order, dtype=np.int64)
        return TaskBatch(*(Tensor(t.data[index]) for t in (self.xs, self.ys, self.xq, self.yq)))

    def task(self, t: int) -> TaskBatch:
        return self.select([t])


def _sizes(value, name: str) -> st.SearchStrategy[int]:
    """An int, an inclusive (lo, hi) range, or a strategy of ints."""
    if isinstance(value, st.SearchStrategy):
        return value
    if isinstance(value, int):
        return st.just(value)
    lo, hi = value
    if not 1 <= lo <= hi:
        raise ValueError(f"{name}: need 1 <= lo <= hi, got {value!r}")
    return st.integers(lo, hi)


def _floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def sinusoid_task_batches(
    draw, num_tasks=(1, 3), k_support=(2, 5), k_query=(2, 5), x_range: float = 5.0
) -> TaskBatch:
    """Sinusoid regression tasks y = A sin(x - phase) (Finn et al. 2017), float64, shapes (T, k, 1).

    Amplitude in [0.1, 5], phase in [0, pi], inputs in [-x_range, x_range].
    ``num_tasks``, ``k_support``, ``k_query``: an int, an inclusive range or a
    strategy.
    """
    t = draw(_sizes(num_tasks, "num_tasks"))
    ks, kq = draw(_sizes(k_support, "k_support")), draw(_sizes(k_query, "k_query"))
    amplitude = draw(hnp.arrays(np.float64, (t, 1, 1), elements=_floats(0.1, 5.0)))
    phase = draw(hnp.arrays(np.float64, (t, 1, 1), elements=_floats(0.0, math.pi)))
    inputs = _floats(-x_range, x_range)
    xs = draw(hnp.arrays(np.float64, (t, ks, 1), elements=inputs))
    xq = draw(hnp.arrays(np.float64, (t, kq, 1), elements=inputs))
    ys, yq = (amplitude * np.sin(x - phase) for x in (xs, xq))
    return TaskBatch(Tensor(xs), Tensor(ys), Tensor(xq), Tensor(yq))


def episode_labels(n_way, k_shot) -> st.SearchStrategy[np.ndarray]:
    """The labels of an N-way K-shot set: each class 0..N-1 exactly K times, shuffled (int64)."""

    def layout(nk):
        n, k = nk
        return st.permutations(list(np.repeat(np.arange(n), k))).map(
            lambda labels: np.asarray(labels, dtype=np.int64)
        )

    return st.tuples(_sizes(n_way, "n_way"), _sizes(k_shot, "k_shot")).flatmap(layout)


@st.composite
def classification_task_batches(
    draw, num_tasks=(1, 3), n_way=(2, 3), k_shot=(1, 3), k_query=(1, 2), features: int = 3
) -> TaskBatch:
    """N-way K-shot episodes: xs (T, N*K, features) float64, ys (T, N*K) int64, labels shuffled.

    Each task draws one mean per class (the classes are separable but close);
    an example is its class mean plus noise. The query set has ``k_query``
    examples per class, also shuffled. Every task has the same N and K.
    """
    t = draw(_sizes(num_tasks, "num_tasks"))
    n, k, kq = (draw(_sizes(v, name)) for v, name in ((n_way, "n_way"), (k_shot, "k_shot"),
                                                      (k_query, "k_query")))  # fmt: skip
    means = draw(hnp.arrays(np.float64, (t, n, features), elements=_floats(-2.0, 2.0)))
    noise = _floats(-0.5, 0.5)
    sets = []
    for shots in (k, kq):
        labels = np.stack([draw(episode_labels(n, shots)) for _ in range(t)])
        x = np.take_along_axis(means, labels[..., None], axis=1)
        x = x + draw(hnp.arrays(np.float64, x.shape, elements=noise))
        sets += [Tensor(x), Tensor(labels)]
    return TaskBatch(*sets)


def _weights(shape: tuple, fan_in: int) -> st.SearchStrategy[np.ndarray]:
    """Float64 weights uniform-ish in +-1.5/sqrt(fan_in): a well-scaled tanh network."""
    bound = 1.5 / math.sqrt(fan_in)
    return hnp.arrays(np.float64, shape, elements=_floats(-bound, bound))


def _leaves(arrays: dict) -> dict:
    return {k: Tensor(v, requires_grad=True) for k, v in arrays.items()}


@st.composite
def mlp_params(draw, in_features: int = 1, out_features: int = 1, hidden=(2, 5), layers=(1, 2)):
    """A float64 MLP's parameters, keyed like ``nn.Sequential(Linear, Tanh, Linear, ...)``:
    ``{"0.weight": (h, in), "0.bias": (h,), "2.weight": ..., ...}``, leaves that require grad.

    ``layers`` counts the hidden layers. ``mlp_forward`` runs the network.
    """
    widths = [draw(_sizes(hidden, "hidden")) for _ in range(draw(_sizes(layers, "layers")))]
    sizes = [in_features, *widths, out_features]
    arrays = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        arrays[f"{2 * i}.weight"] = draw(_weights((n_out, n_in), n_in))
        arrays[f"{2 * i}.bias"] = draw(_weights((n_out,), n_in))
    return _leaves(arrays)


def mlp_forward(params: dict, x):
    """The tanh MLP of ``mlp_params``; parameters may carry a leading task axis (``per_task``),
    then ``x`` is (T, n, in)."""
    from tinymeta import ops

    layers = sorted({int(k.split(".")[0]) for k in params})
    h = x
    for j, i in enumerate(layers):
        h = h @ ops.swapaxes(params[f"{i}.weight"], -1, -2) + ops.expand_dims(
            params[f"{i}.bias"], -2
        )
        if j < len(layers) - 1:
            h = ops.tanh(h)
    return h


@st.composite
def conv_params(
    draw, in_channels: int = 1, image_size: int = 4, channels=(1, 2), kernel_size=(2, 3),
    num_classes: int = 2,
):  # fmt: skip
    """A float64 conv net's parameters, keyed like ``nn.Sequential(Conv2d, Tanh, Flatten,
    Linear)``: ``{"0.weight": (c, in, k, k), "0.bias": (c,), "3.weight": (classes, c*m*m),
    "3.bias": (classes,)}`` for ``image_size``-square inputs (m = image_size - k + 1).
    ``conv_forward`` runs the network.
    """
    c = draw(_sizes(channels, "channels"))
    k = draw(_sizes(kernel_size, "kernel_size"))
    if k > image_size:
        raise ValueError(f"conv_params: kernel_size {k} is larger than image_size {image_size}")
    fan_in = in_channels * k * k
    flat = c * (image_size - k + 1) ** 2
    return _leaves(
        {
            "0.weight": draw(_weights((c, in_channels, k, k), fan_in)),
            "0.bias": draw(_weights((c,), fan_in)),
            "3.weight": draw(_weights((num_classes, flat), flat)),
            "3.bias": draw(_weights((num_classes,), flat)),
        }
    )


def conv_forward(params: dict, x):
    """The conv net of ``conv_params``: x (N, C, H, W), or (T, N, C, H, W) with per-task params."""
    from tinymeta import ops
    from tinymeta.nn import functional as F

    h = ops.tanh(F.conv2d(x, params["0.weight"], params["0.bias"]))
    h = ops.reshape(h, h.shape[: h.ndim - 3] + (-1,))
    return h @ ops.swapaxes(params["3.weight"], -1, -2) + ops.expand_dims(params["3.bias"], -2)


@dataclass(frozen=True)
class InnerLoopConfig:
    """How to adapt: ``steps`` inner updates at rate ``lr``, first or second order."""

    steps: int
    lr: float
    first_order: bool


def inner_loop_configs(steps=(1, 2), lr=(0.05, 0.5), first_order=None):
    """``InnerLoopConfig``s: ``steps`` an int, inclusive range or strategy; ``lr`` a
    float or an inclusive (lo, hi) range; ``first_order`` a bool, or None for either."""
    rates = st.just(float(lr)) if isinstance(lr, (int, float)) else _floats(*lr)
    orders = st.booleans() if first_order is None else st.just(bool(first_order))
    return st.builds(InnerLoopConfig, _sizes(steps, "steps"), rates, orders)
