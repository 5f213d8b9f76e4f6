"""Every differentiable op from one table.

Each case names a tinymeta function, its NumPy reference, the shapes of its
inputs (0-d, size-1 axes and broadcasting pairs included) and their domain
(positive for log/sqrt, away from the kinks of abs/relu/clip, no ties for
max/min/maximum). The table drives, per op and through Hypothesis:

- the forward pass against NumPy (float64);
- gradients of order 1, 2 and 3 against finite differences (``check_grads``);
- non-contiguous inputs (strided, reversed and transposed views): same values
  and gradients as contiguous ones, and the inputs are left untouched;
- float32 inputs: the output and the gradients (first and second order) stay
  float32, Python scalars in the expression do not promote, and the values
  agree with float64.

The forward, gradient and float32 tests run on every device (the ``device``
parameter, see conftest.py): on cuda the inputs are CuPy arrays, the constants
(indices, masks, conditions) stay NumPy arrays and must follow the data to the
GPU, and the results are compared on the host with the same tolerances.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinymeta as tm
from tinymeta.testing import check_grads
from tinymeta.testing import strategies as tms

# Per-test example budgets, scaled from the active profile (see conftest.py).
_EXAMPLES = settings.default.max_examples
FEW = max(3, _EXAMPLES // 5)
SOME = max(5, _EXAMPLES // 2)

# --- input domains: a function from a shape to a strategy of float64 arrays --------------


def _elements(elements):
    return lambda shape: tms.arrays(shape, elements=elements)


ANY = _elements(tms.well_conditioned(bound=2.0))
POSITIVE = _elements(tms.well_conditioned(bound=3.0, min_magnitude=0.3, positive=True))
BASE = _elements(tms.well_conditioned(bound=2.0, min_magnitude=0.5, positive=True))
NONZERO = _elements(tms.well_conditioned(bound=3.0, min_magnitude=0.5))
NO_KINK_AT_0 = _elements(tms.well_conditioned(bound=2.0, min_magnitude=0.05))
NO_KINK_AT_HALF = _elements(tms.well_conditioned(bound=2.0, avoid=(-0.5, 0.5, 1.0)))
DISTINCT = tms.distinct_arrays  # pairwise 0.1 apart: the arg-max is stable
# maximum/minimum: one input on the lattice 0.25 Z, the other half-way between: no ties.
ON_GRID = _elements(st.integers(-8, 8).map(lambda i: 0.25 * i))
OFF_GRID = _elements(st.integers(-8, 7).map(lambda i: 0.25 * i + 0.125))

# --- shapes: a strategy of a tuple with one shape per input -----------------------------


def _unary(**kw):
    kw.setdefault("max_side", 4)
    return tms.shapes(**kw).map(lambda s: (s,))


UNARY = _unary()  # includes 0-d and size-1 axes
PAIR = tms.broadcastable_shapes(2, max_side=4)


@st.composite
def _matmul_shapes(draw, kind: str):
    n, m, k = (draw(st.integers(1, 4)) for _ in range(3))
    batch = tms.broadcastable_shapes(2, min_dims=0, max_dims=2, max_side=3)
    if kind == "1d@1d":
        return (n,), (n,)
    if kind == "2d@2d":
        return (m, n), (n, k)
    if kind == "1d@2d":
        return (n,), (n, k)
    if kind == "2d@1d":
        return (m, n), (n,)
    if kind == "batched":
        ba, bb = draw(batch)
        return ba + (m, n), bb + (n, k)
    if kind == "1d@batched":
        return (n,), draw(tms.shapes(1, 2, max_side=3)) + (n, k)
    if kind == "batched@1d":
        return draw(tms.shapes(1, 2, max_side=3)) + (m, n), (n,)
    raise AssertionError(kind)


@st.composite
def _einsum_shapes(draw, spec: str):
    """Shapes for the input terms of ``spec`` (letters only, no ellipsis), one size per letter."""
    terms = spec.split("->")[0].split(",")
    sizes = {c: draw(st.integers(1, 4)) for c in sorted(set("".join(terms)))}
    return tuple(tuple(sizes[c] for c in term) for term in terms)


@st.composite
def _joinable_shapes(draw, n: int, axis: int, same: bool):
    """``n`` shapes equal except along ``axis`` (or all equal, for stack)."""
    base = list(draw(tms.shapes(min_dims=1, max_dims=3, max_side=4)))
    out = []
    for _ in range(n):
        s = list(base)
        if not same:
            s[axis] = draw(st.integers(1, 4))
        out.append(tuple(s))
    return tuple(out)


# --- constants drawn next to the inputs (indices, masks, conditions) ----------------------


@st.composite
def _repeated_index(draw, n: int, size: int = 6):
    """An integer index array into an axis of length n, negative indices and a repeat included."""
    idx = draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=size))
    return np.array(idx + [idx[0]], dtype=np.int64)


def _int_index(shapes):
    return _repeated_index(shapes[0][0]).map(lambda i: {"index": i})


def _int_index_2d(shapes):
    n = shapes[0][0]
    index = hnp.arrays(np.int64, (2, 3), elements=st.integers(-n, n - 1))
    return index.map(lambda i: {"index": i})


def _index_pair(shapes):
    n0, n1 = shapes[0][:2]
    return st.tuples(_repeated_index(n0, 4), st.integers(-n1, n1 - 1)).map(
        lambda t: {"index": (t[0], np.full(t[0].shape, t[1]))}
    )


def _full_mask(shapes):
    return hnp.arrays(np.bool_, shapes[0]).map(lambda m: {"mask": m})


def _row_mask(shapes):
    return hnp.arrays(np.bool_, shapes[0][:1]).map(lambda m: {"mask": m})


def _condition(shapes):
    out = np.broadcast_shapes(*shapes)
    return st.integers(0, len(out)).flatmap(
        lambda k: hnp.arrays(np.bool_, out[k:]).map(lambda c: {"cond": c})
    )


# --- the table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    fn: Callable  # tinymeta: fn(*tensors, **extra)
    ref: Callable  # NumPy: ref(*arrays, **extra)
    shapes: st.SearchStrategy  # one shape per input
    domain: object = ANY  # a shape -> array strategy, or a tuple of them (one per input)
    extra: Callable | None = None  # shapes -> strategy of a dict of constant keyword args
    order: int = 3
    check: dict = field(default_factory=dict)  # eps/atol/rtol for check_grads
    float32: bool = True  # does float32 in give float32 out?
    out_device: str | None = None  # where the output lives (None: the inputs' device)

    def __repr__(self):
        return self.name


def _lse(a, axis=None, keepdims=False):
    return np.log(np.sum(np.exp(a), axis=axis, keepdims=keepdims))


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _reduction_cases() -> list:
    """sum mean var max min logsumexp with axis None / int / negative int / tuple, keepdims."""
    ops = {
        "sum": (lambda x, axis, keepdims: x.sum(axis, keepdims), np.sum, ANY),
        "mean": (lambda x, axis, keepdims: tm.mean(x, axis=axis, keepdims=keepdims), np.mean, ANY),
        "var": (lambda x, axis, keepdims: x.var(axis=axis, keepdims=keepdims), np.var, ANY),
        "max": (lambda x, axis, keepdims: x.max(axis, keepdims=keepdims), np.max, DISTINCT),
        "min": (lambda x, axis, keepdims: tm.min(x, axis, keepdims), np.min, DISTINCT),
        "logsumexp": (lambda x, axis, keepdims: tm.logsumexp(x, axis, keepdims), _lse, ANY),
    }
    axes = (
        (None, False, UNARY),
        (0, True, _unary(min_dims=1)),
        (-1, False, _unary(min_dims=1)),
        ((0, -1), False, _unary(min_dims=2)),
        ((2, 0), True, _unary(min_dims=3)),
    )
    return [
        Case(
            f"{name}[axis={axis},keepdims={keepdims}]",
            functools.partial(fn, axis=axis, keepdims=keepdims),
            functools.partial(ref, axis=axis, keepdims=keepdims),
            shapes,
            domain,
        )
        for name, (fn, ref, domain) in ops.items()
        for axis, keepdims, shapes in axes
    ]


def _bigger(shape):
    return (2,) + tuple(3 if n == 1 else n for n in shape)


CASES = [
    # arithmetic, tensors on both sides and broadcasting
    Case("add", lambda a, b: a + b, np.add, PAIR),
    Case("sub", lambda a, b: a - b, np.subtract, PAIR),
    Case("add_scaled", lambda a, b: tm.ops.add_scaled(a, b, -0.7), lambda a, b: a - 0.7 * b, PAIR),
    Case("mul", lambda a, b: a * b, np.multiply, PAIR),
    Case("div", lambda a, b: a / b, np.divide, PAIR, (ANY, NONZERO)),
    Case("pow[tensor exponent]", lambda a, b: a**b, np.power, PAIR, (BASE, ANY)),
    Case("neg", lambda x: -x, np.negative, UNARY),
    # a Python scalar on either side keeps the tensor's dtype
    Case("add[scalar]", lambda x: 2.5 + x, lambda a: 2.5 + a, UNARY),
    Case("sub[scalar]", lambda x: 1.5 - x, lambda a: 1.5 - a, UNARY),
    Case("mul[scalar]", lambda x: x * -3.0, lambda a: a * -3.0, UNARY),
    Case("mul[int scalar on the left]", lambda x: 2 * x, lambda a: 2 * a, UNARY),
    Case("div[scalar]", lambda x: 2.0 / x, lambda a: 2.0 / a, UNARY, NONZERO),
    Case("pow[scalar base]", lambda x: 2.0**x, lambda a: 2.0**a, UNARY),
    Case("pow[const 2]", lambda x: x**2, lambda a: a**2, UNARY),
    Case("pow[const 3]", lambda x: x**3, lambda a: a**3, UNARY),
    Case("pow[const 0.5]", lambda x: x**0.5, np.sqrt, UNARY, POSITIVE),
    Case("pow[const -1.5]", lambda x: x**-1.5, lambda a: a**-1.5, UNARY, POSITIVE),
    Case("pow[numpy scalar]", lambda x: x ** np.float64(2.5), lambda a: a**2.5, UNARY, POSITIVE),
    # matmul: NumPy semantics, 1-D operands and broadcast batches
    *(
        Case(f"matmul[{kind}]", tm.matmul, np.matmul, _matmul_shapes(kind))
        for kind in ("1d@1d", "2d@2d", "1d@2d", "2d@1d", "batched", "1d@batched", "batched@1d")
    ),
    Case("matmul[operator]", lambda a, b: a @ b, np.matmul, _matmul_shapes("batched")),
    # einsum
    *(
        Case(
            f"einsum[{spec}]",
            lambda *xs, spec=spec: tm.einsum(spec, *xs),
            lambda *xs, spec=spec: np.einsum(spec, *xs),
            _einsum_shapes(spec),
        )
        for spec in (
            "ij,jk->ik",
            "i,i->",
            "i,j->ij",
            "bij,bjk->bik",
            "ij->ji",
            "ijk->j",
            "ij,ij->ij",
            "ij,jk",  # implicit output
            "ii->",  # trace
            "ii->i",  # diagonal
            "iij,j->i",
        )
    ),
    Case(
        "einsum[...ij,...jk->...ik]",
        lambda a, b: tm.einsum("...ij,...jk->...ik", a, b),
        lambda a, b: np.einsum("...ij,...jk->...ik", a, b),
        _matmul_shapes("batched"),
    ),
    # elementwise
    Case("exp", tm.exp, np.exp, UNARY),
    Case("log", tm.log, np.log, UNARY, POSITIVE),
    Case("sqrt", lambda x: x.sqrt(), np.sqrt, UNARY, POSITIVE),
    Case("abs", tm.abs, np.abs, UNARY, NO_KINK_AT_0),
    Case("abs[builtin]", abs, np.abs, UNARY, NO_KINK_AT_0),
    Case("sin", tm.sin, np.sin, UNARY),
    Case("cos", lambda x: x.cos(), np.cos, UNARY),
    Case("tanh", tm.tanh, np.tanh, UNARY),
    Case("sigmoid", tm.sigmoid, _sigmoid, UNARY),
    Case("relu", lambda x: x.relu(), lambda a: np.maximum(a, 0), UNARY, NO_KINK_AT_0),
    Case(
        "clip",
        lambda x: x.clip(-0.5, 0.5),
        lambda a: np.clip(a, -0.5, 0.5),
        UNARY,
        NO_KINK_AT_HALF,
    ),
    Case(
        "clip[hi only]",
        lambda x: tm.clip(x, None, 1.0),
        lambda a: np.minimum(a, 1.0),
        UNARY,
        NO_KINK_AT_HALF,
    ),
    Case("maximum", tm.maximum, np.maximum, PAIR, (ON_GRID, OFF_GRID)),
    Case("minimum", tm.minimum, np.minimum, PAIR, (OFF_GRID, ON_GRID)),
    Case(
        "where",
        lambda a, b, cond: tm.where(cond, a, b),
        lambda a, b, cond: np.where(cond, a, b),
        PAIR,
        extra=_condition,
    ),
    Case(
        "where[scalar]",
        lambda a, cond: tm.where(cond, a, 0.5),
        lambda a, cond: np.where(cond, a, 0.5),
        UNARY,
        extra=_condition,
    ),
    *_reduction_cases(),
    # shape ops
    Case("reshape[-1]", lambda x: x.reshape(-1), lambda a: a.reshape(-1), UNARY),
    Case(
        "reshape[reversed shape]",
        lambda x: tm.reshape(x, x.shape[::-1] + (1,)),
        lambda a: a.reshape(a.shape[::-1] + (1,)),
        UNARY,
    ),
    Case("reshape[*shape]", lambda x: x.reshape(1, *x.shape), lambda a: a[None], UNARY),
    Case("T", lambda x: x.T, lambda a: a.T, UNARY),
    Case("transpose[]", lambda x: x.transpose(), lambda a: a.transpose(), UNARY),
    Case(
        "transpose[(1, 2, 0)]",
        lambda x: tm.transpose(x, (1, 2, 0)),
        lambda a: np.transpose(a, (1, 2, 0)),
        _unary(min_dims=3, max_dims=3),
    ),
    Case(
        "transpose[-1, 0]",
        lambda x: x.transpose(-1, 0),
        lambda a: np.transpose(a, (-1, 0)),
        _unary(min_dims=2, max_dims=2),
    ),
    Case(
        "swapaxes",
        lambda x: x.swapaxes(0, -1),
        lambda a: np.swapaxes(a, 0, -1),
        _unary(min_dims=1),
    ),
    Case(
        "broadcast_to",
        lambda x: x.broadcast_to(_bigger(x.shape)),
        lambda a: np.broadcast_to(a, _bigger(a.shape)),
        UNARY,
    ),
    Case("squeeze[all]", lambda x: x.squeeze(), np.squeeze, UNARY),
    Case(
        "squeeze[axis=0]",
        lambda x: tm.squeeze(x, 0),
        lambda a: np.squeeze(a, 0),
        tms.shapes(0, 3, max_side=4).map(lambda s: ((1,) + s,)),
    ),
    Case(
        "squeeze[axis=(0, -1)]",
        lambda x: x.squeeze((0, -1)),
        lambda a: np.squeeze(a, (0, -1)),
        tms.shapes(0, 2, max_side=4).map(lambda s: ((1,) + s + (1,),)),
    ),
    Case("expand_dims[0]", lambda x: tm.expand_dims(x, 0), lambda a: a[None], UNARY),
    Case(
        "expand_dims[(0, 2)]",
        lambda x: x.expand_dims((0, 2)),
        lambda a: np.expand_dims(a, (0, 2)),
        _unary(min_dims=1),
    ),
    Case("unsqueeze[-1]", lambda x: x.unsqueeze(-1), lambda a: a[..., None], UNARY),
    Case("flatten", lambda x: x.flatten(), lambda a: a.reshape(-1), UNARY),
    Case(
        "flatten[1]",
        lambda x: tm.flatten(x, 1),
        lambda a: a.reshape(a.shape[0], -1),
        _unary(min_dims=2),
    ),
    # indexing
    Case(
        "getitem[basic slices]",
        lambda x: x[1:, ::2],
        lambda a: a[1:, ::2],
        _unary(min_dims=2, min_side=2),
    ),
    Case(
        "getitem[negative steps]",
        lambda x: x[::-1, -1::-2],
        lambda a: a[::-1, -1::-2],
        _unary(min_dims=2),
    ),
    Case(
        "getitem[int, None, ...]",
        lambda x: x[-1, None, ..., 0],
        lambda a: a[-1, None, ..., 0],
        _unary(min_dims=2),
    ),
    Case(
        "getitem[int array, repeats]",
        lambda x, index: x[index],
        lambda a, index: a[index],
        _unary(min_dims=1),
        extra=_int_index,
    ),
    Case(
        "getitem[2-D int array]",
        lambda x, index: x[index],
        lambda a, index: a[index],
        _unary(min_dims=1, max_dims=2),
        extra=_int_index_2d,
    ),
    Case(
        "getitem[int array pair]",
        lambda x, index: x[index],
        lambda a, index: a[index],
        _unary(min_dims=2),
        extra=_index_pair,
    ),
    Case(
        "getitem[int tensor, slice]",
        lambda x, index: x[tm.tensor(index), 1:],
        lambda a, index: a[index, 1:],
        _unary(min_dims=2),
        extra=_int_index,
    ),
    Case(
        "getitem[bool mask]",
        lambda x, mask: x[mask],
        lambda a, mask: a[mask],
        _unary(min_dims=1),
        extra=_full_mask,
    ),
    Case(
        "getitem[bool rows]",
        lambda x, mask: x[tm.tensor(mask)],
        lambda a, mask: a[mask],
        _unary(min_dims=2),
        extra=_row_mask,
    ),
    # joining
    Case(
        "concatenate[axis=0]",
        lambda *xs: tm.concatenate(xs, axis=0),
        lambda *xs: np.concatenate(xs, axis=0),
        _joinable_shapes(3, 0, same=False),
    ),
    Case(
        "concatenate[axis=-1]",
        lambda *xs: tm.concatenate(list(xs), -1),
        lambda *xs: np.concatenate(xs, axis=-1),
        _joinable_shapes(2, -1, same=False),
    ),
    Case(
        "stack[axis=0]",
        lambda *xs: tm.stack(xs),
        lambda *xs: np.stack(xs),
        _joinable_shapes(3, 0, same=True),
    ),
    Case(
        "stack[axis=-1]",
        lambda *xs: tm.stack(list(xs), axis=-1),
        lambda *xs: np.stack(xs, axis=-1),
        _joinable_shapes(2, 0, same=True),
    ),
    # casts: float32 rounding makes the finite differences noisy, hence the bigger step
    Case(
        "astype[float32 and back]",
        lambda x: x.astype(tm.float32).astype(tm.float64),
        lambda a: a.astype(np.float32).astype(np.float64),
        UNARY,
        check={"eps": 1e-2, "atol": 1e-3},
        float32=False,
    ),
    Case("to[cpu]", lambda x: x.to("cpu") * 2.0, lambda a: a * 2.0, UNARY, out_device="cpu"),
]

# API.md's differentiable ops: each must have at least one case.
API_OPS = (
    "add sub mul div pow neg matmul einsum exp log sqrt abs sin cos tanh sigmoid relu sum mean "
    "var max min logsumexp reshape transpose T swapaxes broadcast_to squeeze expand_dims "
    "unsqueeze flatten clip maximum minimum where getitem concatenate stack astype"
).split()

IDS = [c.name for c in CASES]
assert len(set(IDS)) == len(IDS), "case names must be unique"


def test_table_covers_every_op():
    covered = {c.name.split("[")[0] for c in CASES}
    missing = [op for op in API_OPS if op not in covered]
    assert not missing, f"ops without a case: {missing}"


# --- drawing a case's inputs ---------------------------------------------------------------


def _draw(data, case: Case, shapes=None):
    shapes = data.draw(case.shapes if shapes is None else shapes, label="shapes")
    domains = case.domain if isinstance(case.domain, tuple) else (case.domain,) * len(shapes)
    assert len(domains) == len(shapes), case.name
    arrays = [data.draw(d(s), label=f"input {i}") for i, (d, s) in enumerate(zip(domains, shapes))]
    extra = data.draw(case.extra(shapes), label="constants") if case.extra else {}
    return arrays, extra


def _cotangent(rng, y) -> tm.Tensor:
    return tm.tensor(rng.standard_normal(y.shape).astype(y.dtype), device=y.device)


# --- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
@settings(max_examples=SOME)
@given(data=st.data())
def test_forward_matches_numpy(case, data, device):
    arrays, extra = _draw(data, case)
    y = case.fn(*[tm.tensor(a, device=device) for a in arrays], **extra)
    expected = np.asarray(case.ref(*arrays, **extra))
    assert isinstance(y, tm.Tensor)
    assert y.device == (case.out_device or device)
    assert y.shape == expected.shape
    assert y.dtype == expected.dtype
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@settings(max_examples=_EXAMPLES)
@given(data=st.data())
def test_gradients_order_1_to_3(case, data, device):
    arrays, extra = _draw(data, case)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    inputs = [tm.tensor(a, device=device) for a in arrays]
    assert check_grads(
        lambda *xs: case.fn(*xs, **extra), inputs, order=case.order, seed=seed, **case.check
    )


def _has_two_elements(shapes) -> bool:
    return any(math.prod(s) >= 2 for s in shapes)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@settings(max_examples=FEW)
@given(data=st.data())
def test_noncontiguous_inputs(case, data):
    arrays, extra = _draw(data, case, case.shapes.filter(_has_two_elements))
    hows = [data.draw(st.sampled_from(["stride", "reverse", "transpose"])) for _ in arrays]
    views = [tms.as_noncontiguous(a, how) for a, how in zip(arrays, hows)]
    assert any(not v.flags.c_contiguous for v in views)
    strided = [tm.from_numpy(v).requires_grad_() for v in views]
    dense = [tm.tensor(a, requires_grad=True) for a in arrays]

    y_strided, y_dense = case.fn(*strided, **extra), case.fn(*dense, **extra)
    np.testing.assert_allclose(y_strided.numpy(), y_dense.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        y_strided.numpy(), case.ref(*arrays, **extra), rtol=1e-10, atol=1e-12
    )

    gy = _cotangent(np.random.default_rng(0), y_dense)
    g_strided = tm.grad(y_strided, strided, grad_outputs=gy)
    g_dense = tm.grad(y_dense, dense, grad_outputs=gy)
    for gs, gd in zip(g_strided, g_dense):
        np.testing.assert_allclose(gs.numpy(), gd.numpy(), rtol=1e-12, atol=1e-12)
    for v, a in zip(views, arrays):  # nothing wrote into the inputs
        np.testing.assert_array_equal(v, a)


@pytest.mark.parametrize("case", [c for c in CASES if c.float32], ids=lambda c: c.name)
@settings(max_examples=FEW)
@given(data=st.data())
def test_float32_stays_float32(case, data, device):
    arrays, extra = _draw(data, case)
    rng = np.random.default_rng(1)
    x32 = [tm.tensor(a.astype(np.float32), device=device, requires_grad=True) for a in arrays]
    x64 = [tm.tensor(a, device=device, requires_grad=True) for a in arrays]
    y32, y64 = case.fn(*x32, **extra), case.fn(*x64, **extra)
    assert y32.dtype == tm.float32
    np.testing.assert_allclose(y32.numpy(), y64.numpy(), rtol=1e-4, atol=1e-5)

    gy = _cotangent(rng, y32)
    g32 = tm.grad(y32, x32, grad_outputs=gy, create_graph=True)
    g64 = tm.grad(y64, x64, grad_outputs=gy.astype(tm.float64))
    for x, g, ref in zip(x32, g32, g64):
        assert g.dtype == tm.float32 and g.shape == x.shape
        np.testing.assert_allclose(g.numpy(), ref.numpy(), rtol=1e-3, atol=1e-4)

    # Second order: differentiate <g, r> again; every gradient is still float32.
    s = tm.sum(tm.stack([(g * _cotangent(rng, g)).sum() for g in g32]))
    if s.requires_grad:
        for x, gg in zip(x32, tm.grad(s, x32, allow_unused=True)):
            assert gg is None or (gg.dtype == tm.float32 and gg.shape == x.shape)


def test_getitem_repeated_indices_accumulate(device):
    x = tm.tensor([1.0, 2.0, 3.0], device=device, requires_grad=True)
    y = x[np.array([0, 2, 0, 0])]
    (y * tm.tensor([1.0, 10.0, 100.0, 1000.0], device=device)).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1101.0, 0.0, 10.0])


def test_getitem_repeated_pairs_accumulate_in_2d(device):
    x = tm.zeros(2, 3, device=device, requires_grad=True)
    rows, cols = np.array([1, 1, 0, 1]), np.array([2, 2, 0, -1])
    (g,) = tm.grad(x[rows, cols].sum(), x)
    np.testing.assert_array_equal(g.numpy(), [[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])


def test_getitem_repeated_indices_second_order(device):
    # d/dx sum(x[idx]**2) = 2 x * count;  its gradient again: 2 * count on the diagonal.
    x = tm.tensor([1.0, 2.0, 3.0], dtype=tm.float64, device=device, requires_grad=True)
    idx = np.array([2, 2, 0, 2])
    (g,) = tm.grad((x[idx] ** 2).sum(), x, create_graph=True)
    np.testing.assert_array_equal(g.numpy(), [2.0, 0.0, 18.0])
    (gg,) = tm.grad(g.sum(), x)
    np.testing.assert_array_equal(gg.numpy(), [2.0, 0.0, 6.0])


# --- documented conventions at kinks and edge cases ------------------------------------------


def _grad_at(fn, values, device="cpu"):
    x = tm.tensor(values, dtype=tm.float64, device=device, requires_grad=True)
    (g,) = tm.grad(fn(x).sum(), x)
    return g.numpy()


def test_relu_and_abs_have_derivative_0_at_0(device):
    np.testing.assert_array_equal(_grad_at(tm.relu, [-1.0, 0.0, 2.0], device), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(_grad_at(tm.abs, [-1.0, 0.0, 2.0], device), [-1.0, 0.0, 1.0])


def test_clip_passes_the_gradient_at_its_bounds(device):
    g = _grad_at(lambda x: x.clip(-1.0, 1.0), [-2.0, -1.0, 0.0, 1.0, 2.0], device)
    np.testing.assert_array_equal(g, [0.0, 1.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("op", [tm.max, tm.min])
def test_max_min_split_ties_evenly(op, device):
    g = _grad_at(lambda x: op(x, axis=1), [[3.0, 3.0, 1.0], [2.0, 2.0, 2.0]], device)
    if op is tm.min:
        np.testing.assert_allclose(g, [[0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]])
    else:
        np.testing.assert_allclose(g, [[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert g.sum() == pytest.approx(2.0)  # as much gradient as for a unique arg-max


def test_maximum_minimum_split_ties_evenly(device):
    a = tm.tensor([1.0, 2.0, 3.0], dtype=tm.float64, device=device, requires_grad=True)
    b = tm.tensor([2.0, 2.0, 2.0], dtype=tm.float64, device=device, requires_grad=True)
    for op, ga, gb in (
        (tm.maximum, [0.0, 0.5, 1.0], [1.0, 0.5, 0.0]),
        (tm.minimum, [1.0, 0.5, 0.0], [0.0, 0.5, 1.0]),
    ):
        ga_, gb_ = tm.grad(op(a, b).sum(), [a, b])
        np.testing.assert_array_equal(ga_.numpy(), ga)
        np.testing.assert_array_equal(gb_.numpy(), gb)


def test_times_a_number_is_one_scale_node_that_saves_nothing(device):
    x = tm.tensor(np.array([1.0, -2.0], dtype=np.float32), device=device, requires_grad=True)
    for y in (x * 0.5, 0.5 * x, x * 3):
        assert y.grad_fn.op_name() == "Scale" and y.grad_fn.inputs == (x,)
        assert y.dtype == np.float32 and not y.grad_fn.saves_inputs
    (g,) = tm.grad((x * 0.5).sum(), x, create_graph=True)
    assert g.grad_fn is None  # gy is a constant: c * gy needs no node
    np.testing.assert_allclose(g.numpy(), [0.5, 0.5])
    # Not a float tensor, or not a Python number: the general Mul and its dtype rules.
    ints = tm.tensor(np.array([1, 2], dtype=np.int32), device=device)
    assert (ints * 2).dtype == np.int32 and (ints * 2.5).dtype.kind == "f"
    np.testing.assert_array_equal((ints * 2.5).numpy(), [2.5, 5.0])
    y = x * np.float64(2.0)
    assert y.grad_fn.op_name() == "Mul" and y.dtype == np.float32


def test_power_0_and_1_are_smooth_at_0(device):
    # x**0 = 1 and x**1 = x: every derivative is finite at x = 0 (no 0 * inf).
    x = tm.tensor([0.0, 2.0], dtype=tm.float64, device=device, requires_grad=True)
    (g0,) = tm.grad((x**0).sum(), x)
    np.testing.assert_array_equal(g0.numpy(), [0.0, 0.0])
    (g1,) = tm.grad((x**1).sum(), x, create_graph=True)
    np.testing.assert_array_equal(g1.numpy(), [1.0, 1.0])
    (gg1,) = tm.grad(g1.sum(), x, allow_unused=True)
    assert gg1 is None or np.array_equal(gg1.numpy(), [0.0, 0.0])


@pytest.mark.parametrize("op", ["sum", "mean", "max", "min", "var", "logsumexp"])
@pytest.mark.parametrize("axis", [0, -1, None])
def test_reductions_of_a_0d_tensor_over_axis_0_or_minus_1(op, axis, device):
    # np.sum and np.max accept axis 0 / -1 on a 0-d array (a reduction over nothing);
    # tinymeta does so for every reduction, on every device.
    x = tm.tensor(1.5, dtype=tm.float64, device=device, requires_grad=True)
    y = getattr(tm, op)(x, axis=axis)
    assert y.shape == ()
    assert y.item() == (0.0 if op == "var" else 1.5)
    assert check_grads(lambda t: getattr(tm, op)(t, axis=axis), [x], order=2)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@settings(max_examples=FEW)
@given(data=st.data())
def test_matmul_with_transpose_flags_to_third_order(trans_a, trans_b, data):
    """MatMul(trans_a, trans_b) computes op(a) @ op(b) (what the backward rules of matmul
    use); its values and three orders of gradients, with broadcast batch axes."""
    from tinymeta.ops.linalg import MatMul

    m, k, n = (data.draw(st.integers(1, 4)) for _ in range(3))
    batch_a, batch_b = data.draw(tms.broadcastable_shapes(2, min_dims=0, max_dims=2, max_side=3))
    a = data.draw(tms.arrays(batch_a + ((k, m) if trans_a else (m, k))))
    b = data.draw(tms.arrays(batch_b + ((n, k) if trans_b else (k, n))))
    expected = (np.swapaxes(a, -1, -2) if trans_a else a) @ (
        np.swapaxes(b, -1, -2) if trans_b else b
    )

    def fn(x, y):
        return MatMul.apply(x, y, trans_a=trans_a, trans_b=trans_b)

    np.testing.assert_allclose(fn(tm.tensor(a), tm.tensor(b)).numpy(), expected, rtol=1e-12)
    assert check_grads(fn, [tm.tensor(a), tm.tensor(b)], order=3, seed=m * 7 + n)


def test_matmul_backward_uses_no_transpose_nodes():
    x = tm.tensor(np.ones((3, 4)), requires_grad=True)
    w = tm.tensor(np.ones((4, 2)), requires_grad=True)
    gx, gw = tm.grad((x @ w).sum(), [x, w], create_graph=True)
    for g in (gx, gw):
        assert g.grad_fn.op_name() == "MatMul"
        assert all(
            t.grad_fn is None or t.grad_fn.op_name() != "Transpose" for t in g.grad_fn.inputs
        )


@settings(deadline=None, max_examples=10)
@given(data=st.data())
def test_tanh_grad_rules_to_third_order(data):
    """TanhGrad (gy * (1 - y**2)) and its y-derivative TanhGradGrad (-2 y gy ggx), the
    fused nodes of tanh's higher derivatives: values and three orders of gradients in
    every input."""
    from tinymeta.ops.elementwise import TanhGrad, TanhGradGrad

    shape = data.draw(tms.shapes(min_dims=0, max_dims=3, max_side=3))
    y, gy, ggx = (data.draw(tms.arrays(shape)) for _ in range(3))
    tensors = [tm.tensor(a) for a in (y, gy, ggx)]
    np.testing.assert_allclose(TanhGrad.apply(*tensors[:2]).numpy(), gy * (1 - y * y))
    np.testing.assert_allclose(TanhGradGrad.apply(*tensors).numpy(), -2 * y * gy * ggx)
    assert check_grads(TanhGrad.apply, tensors[:2], order=3)
    assert check_grads(TanhGradGrad.apply, tensors, order=3)


def test_square_backward_is_one_product_for_both_inputs():
    """x * x hands gy * x to both inputs (computed once); the sum is 2 x gy, at any order."""
    x = tm.tensor(np.array([0.5, -1.5, 2.0]), requires_grad=True)
    (g,) = tm.grad((x * x).sum(), x, create_graph=True)
    np.testing.assert_allclose(g.numpy(), 2 * x.numpy())
    (h,) = tm.grad((g * g).sum(), x)
    np.testing.assert_allclose(h.numpy(), 8 * x.numpy())
    assert check_grads(lambda t: t * t, [x], order=3)


# --- in-place changes through an alias after the forward --------------------------------------

# Ways to reach a tensor's memory (composed up to twice); each shares the version counter
# when it is a view, and is a copy otherwise. ``from_numpy`` reaches an input through
# the NumPy array it was made from (the inputs below are made by from_numpy).
_ALIASES = {
    "itself": lambda t, arrays: t,
    "t[...]": lambda t, arrays: t[...],
    "t[1:]": lambda t, arrays: t[1:] if t.ndim else t[()],
    "t[None, ..., ::-1]": lambda t, arrays: t[None, ..., ::-1] if t.ndim else t[None],
    "detach": lambda t, arrays: t.detach(),
    "reshape(-1)": lambda t, arrays: t.reshape(-1),
    "flatten": lambda t, arrays: t.flatten(),
    "squeeze": lambda t, arrays: t.squeeze(),
    "unsqueeze(0)": lambda t, arrays: t.unsqueeze(0),
    "expand_dims(-1)": lambda t, arrays: tm.expand_dims(t, -1),
    "T": lambda t, arrays: t.T,
    "swapaxes(0, -1)": lambda t, arrays: t.swapaxes(0, -1) if t.ndim else t,
    "from_numpy": lambda t, arrays: next(
        (tm.from_numpy(a) for a in arrays if a is t.data), t.detach()
    ),
}
_CHANGES = {
    "add_": lambda t: t.add_(0.5),
    "sub_": lambda t: t.sub_(0.25),
    "mul_": lambda t: t.mul_(1.5),
    "copy_": lambda t: t.copy_(np.full(t.shape, 0.3)),
    "zero_": lambda t: t.zero_(),
    "fill_": lambda t: t.fill_(0.7),
    "__setitem__": lambda t: t.__setitem__(..., 0.9),
}


@pytest.mark.parametrize("case", CASES, ids=IDS)
@settings(max_examples=FEW)
@given(data=st.data())
def test_inplace_change_through_an_alias_raises_or_changes_no_gradient(case, data):
    """After the forward (and, at order 2, the first backward with create_graph), change
    an input or the output in place through an alias: the next backward either raises
    the version error or gives the gradients of the unchanged computation."""
    arrays, extra = _draw(data, case)
    order = data.draw(st.sampled_from([1, 2]), label="order")
    target = data.draw(st.integers(0, len(arrays)), label="target (len: the output)")
    kinds = data.draw(st.lists(st.sampled_from(sorted(_ALIASES)), min_size=1, max_size=2))
    change = data.draw(st.sampled_from(sorted(_CHANGES)), label="change")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    gy = rng.standard_normal(np.shape(case.ref(*arrays, **extra)))
    rs = [rng.standard_normal(a.shape) for a in arrays]  # order 2: differentiate sum <g, r>

    def gradients(modify: bool):
        own = [np.array(a) for a in arrays]  # copies (a 0-d draw may be a NumPy scalar)
        xs = [tm.from_numpy(a).requires_grad_() for a in own]
        y = case.fn(*xs, **extra)
        root, seed = y, tm.tensor(gy)
        if order == 2:
            gs = tm.grad(y, xs, grad_outputs=seed, create_graph=True, allow_unused=True)
            terms = [(g * tm.tensor(r)).sum() for g, r in zip(gs, rs) if g is not None]
            root, seed = tm.stack(terms).sum(), None
            if not root.requires_grad:
                return None
        if modify:
            t = y if target == len(xs) else xs[target]
            for kind in kinds:
                t = _ALIASES[kind](t, own)
            if t.data.flags.writeable:  # broadcast views are read-only
                try:
                    with tm.no_grad():
                        _CHANGES[change](t)
                except RuntimeError as e:  # memory a graph computed: refused at once
                    assert "no graph records" in str(e), str(e)
                    return "raised"
        try:
            return tm.grad(root, xs, grad_outputs=seed, allow_unused=True)
        except RuntimeError as e:
            assert "modified in place after the forward" in str(e), str(e)
            return "raised"

    expected = gradients(modify=False)
    got = gradients(modify=True)
    if got == "raised" or expected is None:
        return
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if g is not None:
            np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@settings(max_examples=FEW)
@given(data=st.data())
def test_gradients_are_writable_and_share_memory_with_nothing(case, data):
    """What ``grad`` hands out can be changed in place without changing another gradient,
    an input, the output gradient passed in or the values a graph saved."""
    arrays, extra = _draw(data, case)
    create_graph = data.draw(st.booleans(), label="create_graph")
    xs = [tm.tensor(a, requires_grad=True) for a in arrays]
    y = case.fn(*xs, **extra)
    gy = _cotangent(np.random.default_rng(0), y)
    gs = tm.grad(y, xs + xs[:1], grad_outputs=gy, create_graph=create_graph, retain_graph=True)
    others = [x.data for x in xs] + [gy.data, y.data]
    for i, g in enumerate(gs):
        assert g.data.flags.writeable, i
        for other in [h.data for h in gs[:i]] + others:
            assert not np.may_share_memory(g.data, other), i
    before = [g.numpy().copy() for g in gs]
    with tm.no_grad():
        for g in gs:
            if g.grad_fn is not None:  # a gradient with a graph: changed behind it, refused
                with pytest.raises(RuntimeError, match="no graph records"):
                    g.add_(1.0)
            else:
                g.add_(1.0)
    again = tm.grad(y, xs + xs[:1], grad_outputs=gy)  # from the values the graph saved
    for b, a in zip(before, again):
        np.testing.assert_array_equal(b, a.numpy())
