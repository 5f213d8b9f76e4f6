"""Random programs for differential tests of the engine.

``programs()`` is a Hypothesis strategy that draws a small program over 1-3 float64 inputs:
3-12 steps, each applying an op of ``OPS`` to earlier values (any earlier value, so values are
reused and gradients must accumulate), ending in a scalar: the weighted sum of the last value
and a few earlier ones. ``run(program, xs, lib)`` replays it in tinymeta (``lib="tm"``) or in
PyTorch (``lib="torch"``) on tensors of either library.

Values stay where finite differences are well-conditioned: log and sqrt see ``1 + x**2``,
division sees ``1 + b**2``, every value stays within ``LIMIT``, and a step whose input lies
within ``MARGIN`` of a kink (relu/abs at 0, a max/min tie, a clip bound, ``where``'s
condition) is not drawn. The generator evaluates each step with tinymeta (forward only) as
it draws, to know shapes and values.

Kept out, because the two libraries legitimately differ there (docs/autograd-rules.md):
``a ** b`` at a = 0 (tinymeta's higher derivatives stay finite where PyTorch's are NaN:
bases here are ``1 + a**2``), ties of max/min (``torch.max(dim)`` routes the gradient to one
element: ``amax`` is used, and ties are kept out anyway), ``.T`` of other than 2-D tensors
(deprecated in PyTorch), negative slice steps (PyTorch has none) and ``var`` with
PyTorch's default correction (``correction=0`` is NumPy's ``ddof=0``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np
from hypothesis import strategies as st

import tinymeta as tm
import tinymeta.nn.functional as F

MARGIN = 1e-2  # distance kept from every kink; finite differences move values by ~1e-4
LIMIT = 100.0  # a step whose values leave [-LIMIT, LIMIT] is not drawn
MAX_SIZE = 96  # nor one whose result has more elements, or more than MAX_NDIM axes
MAX_NDIM = 4
WIDE = 4096  # relu_wide: ReLU's kernel path (below 4,096 elements it calls NumPy)

torch = None  # imported on first use: the CI tests run without PyTorch


def import_torch():
    global torch
    if torch is None:
        import torch as torch_module

        torch = torch_module
    return torch


# --- programs --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    op: str  # a key of OPS
    args: tuple  # indices of earlier values
    params: tuple = ()  # the op's parameters (axis, shape, index ...), as the op table reads them


@dataclasses.dataclass
class Program:
    inputs: list  # float64 arrays: the values 0 .. len(inputs) - 1
    steps: list  # step k makes value len(inputs) + k
    ends: tuple  # the values summed into the scalar, each times its weight
    weights: list  # float64 arrays, one per end (the end's shape)

    def __repr__(self) -> str:
        n = len(self.inputs)
        lines = [f"v{i} = input {x.shape}" for i, x in enumerate(self.inputs)]
        for k, s in enumerate(self.steps):
            args = ", ".join(f"v{i}" for i in s.args)
            params = f"; {s.params!r}" if s.params else ""
            lines.append(f"v{n + k} = {s.op}({args}{params})")
        lines.append("out = " + " + ".join(f"sum(w{j} * v{i})" for j, i in enumerate(self.ends)))
        return "Program:\n  " + "\n  ".join(lines)


def run(program: Program, xs, lib: str = "tm"):
    """The program's scalar, computed from the inputs ``xs`` (tensors of ``lib``)."""
    return scalar_of(program, run_values(program, xs, lib), lib)


def scalar_of(program: Program, values: list, lib: str = "tm"):
    """The program's scalar from its values (see run_values): its ends times their weights."""
    out = None
    for i, w in zip(program.ends, program.weights):
        term = (values[i] * _const(lib, w)).sum()
        out = term if out is None else out + term
    return out


def run_values(program: Program, xs, lib: str = "tm") -> list:
    """Every value of the program: the inputs, then one per step."""
    values = list(xs)
    for step in program.steps:
        values.append(OPS[step.op].call(lib)(*(values[i] for i in step.args), *step.params))
    return values


def _const(lib: str, a):
    return a if lib == "tm" else import_torch().from_numpy(np.asarray(a))


# --- the op table ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Op:
    pick: Callable  # (draw, shapes) -> (args, params) or None: which values it applies to
    tm: Callable  # (*args, *params) -> tinymeta tensor
    torch: Callable  # the same in PyTorch
    ok: Callable = lambda *arrays_and_params: True  # the domain: away from kinks

    def call(self, lib: str) -> Callable:
        return self.tm if lib == "tm" else self.torch


def _t():
    return import_torch()


def _dims(ndim, axis):
    """A tinymeta axis (None, int, tuple) as PyTorch's dim (None means every axis)."""
    return tuple(range(ndim)) if axis is None else axis


def _tm_index(spec):
    return tuple(np.array(e) if isinstance(e, list) else e for e in spec)


def _torch_index(spec):
    return tuple(_t().tensor(e) if isinstance(e, list) else e for e in spec)


def _sq(x):  # 1 + x**2: a positive argument for log, sqrt, division and powers
    return 1 + x * x


# Domains (arrays first, then the op's parameters).
def _away_from_zero(x, *_):
    return bool(np.all(np.abs(x) > MARGIN))


def _apart(a, b, *_):  # maximum/minimum: no tie anywhere
    return bool(np.all(np.abs(a - b) > MARGIN))


def _exp_ok(x, *_):
    return bool(np.all(x < 4))


def _pow_ok(a, b, *_):
    return bool(np.all(np.abs(b) < 3))


def _clip_ok(x, lo, hi):
    return bool(np.all(np.abs(x - lo) > MARGIN) and np.all(np.abs(x - hi) > MARGIN))


def _extreme_apart(x, axis, keepdims):
    """max/min: the two largest (and the two smallest) along the reduced axes differ."""
    axes = sorted(
        {int(a) % x.ndim for a in (range(x.ndim) if axis is None else np.atleast_1d(axis))}
    )
    kept = x.ndim - len(axes)
    moved = np.moveaxis(x, axes, range(kept, x.ndim))
    flat = np.sort(moved.reshape(moved.shape[:kept] + (-1,)), axis=-1)
    if flat.shape[-1] < 2:
        return True
    return bool(
        np.all(np.diff(flat[..., :2]) > MARGIN) and np.all(np.diff(flat[..., -2:]) > MARGIN)
    )


def _where_ok(cond, a, b):
    return _away_from_zero(cond)


# --- pickers: which earlier values (by shape) an op applies to, and its parameters --------------


def _choose(draw, options):
    return draw(st.sampled_from(options)) if options else None


def pick_unary(draw, shapes):
    return (draw(st.integers(0, len(shapes) - 1)),), ()


def _pick_unary_if(pred):
    def pick(draw, shapes):
        i = _choose(draw, [i for i, s in enumerate(shapes) if pred(s)])
        return None if i is None else ((i,), ())

    return pick


def _broadcasts(*shapes) -> bool:
    try:
        np.broadcast_shapes(*shapes)
    except ValueError:
        return False
    return True


def pick_binary(draw, shapes):
    pairs = [
        (i, j)
        for i, j in itertools.product(range(len(shapes)), repeat=2)
        if _broadcasts(shapes[i], shapes[j])
    ]
    return _choose(draw, pairs), ()


def pick_where(draw, shapes):
    (a, b), _ = pick_binary(draw, shapes)
    conds = [c for c, s in enumerate(shapes) if _broadcasts(s, shapes[a], shapes[b])]
    return (_choose(draw, conds), a, b), ()


def pick_same_shape(draw, shapes):
    pairs = [
        (i, j) for i, j in itertools.product(range(len(shapes)), repeat=2) if shapes[i] == shapes[j]
    ]
    return _choose(draw, pairs), ()


def _axis(draw, ndim):
    return draw(st.integers(-ndim, ndim - 1))


def pick_reduction(draw, shapes):
    i = _choose(draw, [i for i, s in enumerate(shapes) if len(s) >= 1 and 0 not in s])
    if i is None:
        return None
    ndim = len(shapes[i])
    axes = [None, *range(-ndim, ndim)]
    if ndim >= 2:
        axes.append(tuple(sorted(draw(st.permutations(range(ndim)))[:2])))
    return (i,), (draw(st.sampled_from(axes)), draw(st.booleans()))


def pick_reshape(draw, shapes):
    (i,), _ = pick_unary(draw, shapes)
    size = int(np.prod(shapes[i]))
    first = draw(st.sampled_from([d for d in range(1, size + 1) if size % d == 0]))
    rest = size // first
    second = draw(st.sampled_from([d for d in range(1, rest + 1) if rest % d == 0]))
    shape = (first, second, rest // second)
    if draw(st.booleans()):
        shape = (first, -1)  # let the library work out the last axis
    return (i,), (shape,)


def pick_transpose(draw, shapes):
    i = _choose(draw, [i for i, s in enumerate(shapes) if len(s) >= 2])
    if i is None:
        return None
    return (i,), (tuple(draw(st.permutations(range(len(shapes[i]))))),)


def pick_swapaxes(draw, shapes):
    i = _choose(draw, [i for i, s in enumerate(shapes) if len(s) >= 2])
    if i is None:
        return None
    ndim = len(shapes[i])
    return (i,), (_axis(draw, ndim), _axis(draw, ndim))


def pick_broadcast_to(draw, shapes):
    (i,), _ = pick_unary(draw, shapes)
    shape = tuple(
        draw(st.sampled_from([2, 3])) if d == 1 and draw(st.booleans()) else d for d in shapes[i]
    )
    if draw(st.booleans()):
        shape = (2, *shape)
    return (i,), (shape,)


def pick_squeeze(draw, shapes):
    i = _choose(draw, [i for i, s in enumerate(shapes) if 1 in s])
    if i is None:
        return None
    return (i,), (draw(st.sampled_from([a for a, d in enumerate(shapes[i]) if d == 1])),)


def pick_unsqueeze(draw, shapes):
    (i,), _ = pick_unary(draw, shapes)
    ndim = len(shapes[i])
    return (i,), (draw(st.integers(-ndim - 1, ndim)),)


def pick_basic_index(draw, shapes):
    """x[spec] with ints, positive-step slices, None and Ellipsis (no axis left empty)."""
    i = _choose(draw, [i for i, s in enumerate(shapes) if len(s) >= 1])
    if i is None:
        return None
    spec = []
    used = draw(st.integers(1, len(shapes[i])))  # the leading axes that spec indexes
    for d in shapes[i][:used]:
        kind = draw(st.sampled_from(["int", "slice", "all", "none"]))
        if kind == "int":
            spec.append(draw(st.integers(-d, d - 1)))
        elif kind == "slice":
            start = draw(st.integers(0, d - 1))
            spec.append(slice(start, draw(st.integers(start + 1, d)), draw(st.integers(1, 2))))
        elif kind == "none":
            spec += [None, slice(None)]
        else:
            spec.append(slice(None))
    if draw(st.booleans()):  # in front only when spec names every axis (it then stands for none)
        spec.insert(
            draw(st.sampled_from([0, len(spec)])) if used == len(shapes[i]) else len(spec), Ellipsis
        )
    return (i,), (tuple(spec),)


def pick_array_index(draw, shapes):
    """x[:, ..., [i, j, i]] along one axis: repeated indices, so the backward must add."""
    i = _choose(draw, [i for i, s in enumerate(shapes) if len(s) >= 1])
    if i is None:
        return None
    axis = draw(st.integers(0, len(shapes[i]) - 1))
    d = shapes[i][axis]
    index = draw(st.lists(st.integers(-d, d - 1), min_size=1, max_size=5))
    return (i,), ((slice(None),) * axis + (index,),)


def _matmul_fits(a, b) -> bool:
    if not a or not b:
        return False
    k_a = a[-1]
    k_b = b[0] if len(b) == 1 else b[-2]
    return k_a == k_b and _broadcasts(a[:-2], b[:-2])


def pick_matmul(draw, shapes):
    pairs = [
        (i, j)
        for i, j in itertools.product(range(len(shapes)), repeat=2)
        if _matmul_fits(shapes[i], shapes[j])
    ]
    return _choose(draw, pairs), ()


def pick_matmul_bt(draw, shapes):  # a @ b.swapaxes(-1, -2)
    swapped = [s[:-2] + (s[-1], s[-2]) if len(s) >= 2 else None for s in shapes]
    pairs = [
        (i, j)
        for i, j in itertools.product(range(len(shapes)), repeat=2)
        if swapped[j] is not None and _matmul_fits(shapes[i], swapped[j])
    ]
    return _choose(draw, pairs), ()


EINSUMS = (
    "ij,jk->ik",
    "bij,bjk->bik",
    "ij,ij->i",
    "i,j->ij",
    "ij->ji",
    "ii->i",
    "ij,j->i",
    "ijk->kj",
    "ij,kj->ik",
    "i,i->",
)


def _einsum_fits(subscripts, shapes) -> bool:
    operands = subscripts.split("->")[0].split(",")
    sizes = {}
    for letters, shape in zip(operands, shapes):
        if len(letters) != len(shape):
            return False
        for letter, d in zip(letters, shape):
            if sizes.setdefault(letter, d) != d:
                return False
    return True


def pick_einsum(draw, shapes):
    subscripts = draw(st.sampled_from(EINSUMS))
    arity = subscripts.count(",") + 1
    options = [
        idx
        for idx in itertools.product(range(len(shapes)), repeat=arity)
        if _einsum_fits(subscripts, [shapes[i] for i in idx])
    ]
    return _choose(draw, options), (subscripts,)


def pick_clip(draw, shapes):
    (i,), _ = pick_unary(draw, shapes)
    lo = draw(st.sampled_from([-1.0, -0.5, 0.0]))
    return (i,), (lo, lo + draw(st.sampled_from([0.5, 1.0, 2.0])))


def pick_concatenate(draw, shapes):
    i = _choose(draw, [i for i, s in enumerate(shapes) if len(s) >= 1])
    if i is None:
        return None
    axis = _axis(draw, len(shapes[i]))
    a = axis % len(shapes[i])
    partners = [
        j
        for j, s in enumerate(shapes)
        if len(s) == len(shapes[i]) and s[:a] + s[a + 1 :] == shapes[i][:a] + shapes[i][a + 1 :]
    ]
    return (i, _choose(draw, partners)), (axis,)


def pick_stack(draw, shapes):
    (i, j), _ = pick_same_shape(draw, shapes)
    ndim = len(shapes[i])
    return (i, j), (draw(st.integers(-ndim - 1, ndim)),)


def pick_linear(draw, shapes):
    pairs = [
        (i, j)
        for i, j in itertools.product(range(len(shapes)), repeat=2)
        if len(shapes[j]) == 2 and len(shapes[i]) >= 1 and shapes[i][-1] == shapes[j][1]
    ]
    return _choose(draw, pairs), ()


def pick_linear_bias(draw, shapes):
    picked, _ = pick_linear(draw, shapes)
    if picked is None:
        return None
    x, w = picked
    biases = [k for k, s in enumerate(shapes) if s == (shapes[w][0],)]
    b = _choose(draw, biases)
    return None if b is None else ((x, w, b), ())


def pick_softmax(draw, shapes):
    i = _choose(draw, [i for i, s in enumerate(shapes) if len(s) >= 1])
    return None if i is None else ((i,), (_axis(draw, len(shapes[i])),))


def pick_mse(draw, shapes):
    pair, _ = pick_same_shape(draw, shapes)
    return pair, (draw(st.sampled_from(["mean", "sum", "none"])),)


def pick_cross_entropy(draw, shapes):
    i = _choose(draw, [i for i, s in enumerate(shapes) if len(s) == 2 and s[1] >= 2])
    if i is None:
        return None
    n, c = shapes[i]
    labels = tuple(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    return (i,), (labels, draw(st.sampled_from(["mean", "sum"])))


def pick_pow_int(draw, shapes):
    (i,), _ = pick_unary(draw, shapes)
    return (i,), (draw(st.sampled_from([2, 3])),)


def pick_pow_const(draw, shapes):
    (i,), _ = pick_unary(draw, shapes)
    return (i,), (draw(st.sampled_from([0.5, -0.5, 1.5, -1.0])),)


def _cross_entropy(x, labels, reduction):
    return F.cross_entropy(x, np.array(labels), reduction=reduction)


def _torch_cross_entropy(x, labels, reduction):
    return _t().nn.functional.cross_entropy(x, _t().tensor(labels), reduction=reduction)


def _tm_linear(x, w, b=None):
    return F.linear(x, w, b)


def _torch_linear(x, w, b=None):
    return _t().nn.functional.linear(x, w, b)


def _tm_reduce(method: str):
    return lambda x, axis, keepdims: getattr(x, method)(axis=axis, keepdims=keepdims)


def _torch_reduce(method: str, **fixed):
    def call(x, axis, keepdims):
        return getattr(x, method)(dim=_dims(x.ndim, axis), keepdim=keepdims, **fixed)

    return call


def _tm_relu_wide(x):  # broadcast to WIDE copies, ReLU through the kernel, mean back
    return F.relu(x.broadcast_to((WIDE, *x.shape))).mean(axis=0)


def _torch_relu_wide(x):
    return x.broadcast_to((WIDE, *x.shape)).relu().mean(0)


def _torch_where(c, a, b):
    return _t().where(c > 0, a, b)


def _tm_mse(a, b, reduction):
    return F.mse_loss(a, b, reduction=reduction)


def _torch_mse(a, b, reduction):
    return _t().nn.functional.mse_loss(a, b, reduction=reduction)


def _tm_matmul_bt(a, b):
    return tm.matmul(a, b.swapaxes(-1, -2))


def _torch_matmul_bt(a, b):
    return a @ b.swapaxes(-1, -2)


def _tm_einsum(*args):  # the operands, then the subscripts (the step's parameter)
    return tm.einsum(args[-1], *args[:-1])


def _torch_einsum(*args):
    return _t().einsum(args[-1], *args[:-1])


def _2d(shape) -> bool:  # .T of 2-D tensors only: PyTorch deprecates the rest
    return len(shape) == 2


# One line per op: (which values it applies to, tinymeta, PyTorch, domain); domain notes in
# the comments, the domains themselves above. Arrays given as parameters are constants.
# fmt: off
OPS = {
    "add": Op(pick_binary, lambda a, b: a + b, lambda a, b: a + b),
    "sub": Op(pick_binary, lambda a, b: a - b, lambda a, b: a - b),
    "mul": Op(pick_binary, lambda a, b: a * b, lambda a, b: a * b),
    "div": Op(pick_binary, lambda a, b: a / _sq(b), lambda a, b: a / _sq(b)),  # divisor >= 1
    "rsub": Op(pick_unary, lambda x: 1.5 - x, lambda x: 1.5 - x),  # a Python scalar on the left
    "neg": Op(pick_unary, lambda x: -x, lambda x: -x),
    "pow_int": Op(pick_pow_int, lambda x, k: x**k, lambda x, k: x**k),
    "pow_const": Op(pick_pow_const, lambda x, c: _sq(x) ** c, lambda x, c: _sq(x) ** c),  # >= 1
    "pow_tensor": Op(pick_binary, lambda a, b: _sq(a) ** b, lambda a, b: _sq(a) ** b, _pow_ok),
    "exp": Op(pick_unary, lambda x: x.exp(), lambda x: x.exp(), _exp_ok),  # x < 4
    "log": Op(pick_unary, lambda x: _sq(x).log(), lambda x: _sq(x).log()),
    "sqrt": Op(pick_unary, lambda x: _sq(x).sqrt(), lambda x: _sq(x).sqrt()),
    "tanh": Op(pick_unary, lambda x: x.tanh(), lambda x: x.tanh()),
    "sigmoid": Op(pick_unary, lambda x: tm.sigmoid(x), lambda x: x.sigmoid()),
    "relu": Op(pick_unary, lambda x: x.relu(), lambda x: x.relu(), _away_from_zero),  # kink
    "abs": Op(pick_unary, lambda x: tm.abs(x), lambda x: x.abs(), _away_from_zero),  # kink
    "sin": Op(pick_unary, lambda x: x.sin(), lambda x: x.sin()),
    "cos": Op(pick_unary, lambda x: tm.cos(x), lambda x: x.cos()),
    "sum": Op(pick_reduction, _tm_reduce("sum"), _torch_reduce("sum")),
    "mean": Op(pick_reduction, _tm_reduce("mean"), _torch_reduce("mean")),
    "var": Op(pick_reduction, _tm_reduce("var"), _torch_reduce("var", correction=0)),  # ddof 0
    "max": Op(pick_reduction, _tm_reduce("max"), _torch_reduce("amax"), _extreme_apart),  # ties
    "min": Op(pick_reduction, _tm_reduce("min"), _torch_reduce("amin"), _extreme_apart),  # ties
    "logsumexp": Op(pick_reduction, _tm_reduce("logsumexp"), _torch_reduce("logsumexp")),
    "reshape": Op(pick_reshape, lambda x, s: x.reshape(*s), lambda x, s: x.reshape(*s)),
    "transpose": Op(pick_transpose, lambda x, p: x.transpose(*p), lambda x, p: x.permute(*p)),
    "T": Op(_pick_unary_if(_2d), lambda x: x.T, lambda x: x.T),
    "swapaxes": Op(pick_swapaxes, lambda x, *a: x.swapaxes(*a), lambda x, *a: x.swapaxes(*a)),
    "broadcast_to": Op(pick_broadcast_to, tm.broadcast_to, lambda x, s: x.broadcast_to(s)),
    "squeeze": Op(pick_squeeze, lambda x, a: x.squeeze(a), lambda x, a: x.squeeze(a)),
    "unsqueeze": Op(pick_unsqueeze, lambda x, a: x.unsqueeze(a), lambda x, a: x.unsqueeze(a)),
    "flatten": Op(pick_unary, lambda x: x.flatten(), lambda x: x.flatten()),
    "index": Op(pick_basic_index, lambda x, s: x[s], lambda x, s: x[s]),
    "index_array": Op(pick_array_index, lambda x, s: x[_tm_index(s)], lambda x, s: x[_torch_index(s)]),  # noqa: E501  (repeats add up)
    "matmul": Op(pick_matmul, lambda a, b: a @ b, lambda a, b: a @ b),  # batched, 1-D too
    "matmul_bt": Op(pick_matmul_bt, _tm_matmul_bt, _torch_matmul_bt),
    "einsum": Op(pick_einsum, _tm_einsum, _torch_einsum),
    "where": Op(pick_where, lambda c, a, b: tm.where(c > 0, a, b), _torch_where, _where_ok),
    "maximum": Op(pick_binary, tm.maximum, lambda a, b: _t().maximum(a, b), _apart),  # ties
    "minimum": Op(pick_binary, tm.minimum, lambda a, b: _t().minimum(a, b), _apart),  # ties
    "clip": Op(pick_clip, lambda x, *b: x.clip(*b), lambda x, *b: x.clamp(*b), _clip_ok),
    "concatenate": Op(pick_concatenate, lambda *a: tm.concatenate(a[:2], a[2]), lambda *a: _t().cat(a[:2], a[2])),  # noqa: E501
    "stack": Op(pick_stack, lambda *a: tm.stack(a[:2], a[2]), lambda *a: _t().stack(a[:2], a[2])),
    "linear": Op(pick_linear, _tm_linear, _torch_linear),
    "linear_bias": Op(pick_linear_bias, _tm_linear, _torch_linear),
    "F.relu": Op(pick_unary, F.relu, lambda x: _t().nn.functional.relu(x), _away_from_zero),
    "relu_wide": Op(pick_unary, _tm_relu_wide, _torch_relu_wide, _away_from_zero),
    "softmax": Op(pick_softmax, F.softmax, lambda x, a: x.softmax(a)),
    "log_softmax": Op(pick_softmax, F.log_softmax, lambda x, a: x.log_softmax(a)),
    "mse_loss": Op(pick_mse, _tm_mse, _torch_mse),
    "cross_entropy": Op(pick_cross_entropy, _cross_entropy, _torch_cross_entropy),
}
# fmt: on
OP_NAMES = list(OPS)  # table order: Hypothesis shrinks towards the first, add


# --- the strategy ----------------------------------------------------------------------------


def input_shapes(rng) -> list:
    """1-3 shapes of 1-3 axes that broadcast with a common base (sizes 1-5).

    Drawn from the program's seed, not by Hypothesis: Hypothesis favours the smallest sizes,
    and a third of the programs would run on one-element tensors."""
    base = rng.integers(1, 6, size=rng.integers(1, 4))
    shapes = []
    for _ in range(rng.integers(1, 4)):
        shape = np.where(rng.random(len(base)) < 0.25, 1, base)
        shapes.append(tuple(int(d) for d in shape[rng.integers(0, len(shape)) :]))
    return shapes


def _evaluate(op: Op, values, args, params):
    """The step's value in tinymeta (float64 arrays in, an array out); None outside its domain."""
    arrays = [values[i] for i in args]
    if not op.ok(*arrays, *params):
        return None
    with tm.no_grad():
        y = op.tm(*(tm.tensor(a) for a in arrays), *params).numpy()
    if y.ndim > MAX_NDIM or y.size > MAX_SIZE or y.size == 0 or not np.all(np.abs(y) <= LIMIT):
        return None
    return y


@st.composite
def programs(draw, min_steps: int = 3, max_steps: int = 12, ops=None):
    """A random Program (see the module docstring). ``ops`` limits the op table."""
    names = [n for n in OP_NAMES if n in ops] if ops is not None else OP_NAMES
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    inputs = [rng.standard_normal(s) for s in input_shapes(rng)]
    if draw(st.booleans()):  # column-major inputs: the matmul paths look at the memory layout
        inputs = [np.asfortranarray(x) for x in inputs]
    values = list(inputs)
    steps = []
    wanted = draw(st.integers(min_steps, max_steps))
    for _ in range(4 * max_steps):  # a draw outside an op's domain is skipped
        if len(steps) == wanted:
            break
        name = draw(st.sampled_from(names))
        picked = OPS[name].pick(draw, [v.shape for v in values])
        if picked is None or picked[0] is None or None in picked[0]:
            continue
        args, params = picked
        y = _evaluate(OPS[name], values, args, params)
        if y is None:
            continue
        steps.append(Step(name, tuple(args), tuple(params)))
        values.append(y)
    last = len(values) - 1
    extra = draw(st.lists(st.integers(0, last - 1), max_size=2, unique=True)) if last else []
    ends = (last, *extra)
    weights = [rng.standard_normal(values[i].shape) for i in ends]
    return Program(inputs, steps, ends, weights)
