"""Random programs for differential tests of the engine.

``programs()`` is a Hypothesis strategy that draws a small program over 1-3 float64 inputs:
3-12 steps, each applying an op of ``OPS`` to earlier values (any earlier value, so values are
reused and gradients must accumulate), ending in a scalar: the weighted sum of the last value
and a few earlier ones. ``run(program, xs, lib)`` replays it in tinymeta (``lib="tm"``) or in
PyTorch (``lib="torch"``) on tensors of either library. ``inplace_programs()`` draws programs
with in-place steps too (see "programs with in-place steps" below); ``derivatives``,
``train`` and ``backward_grads`` run a program the ways the tests compare.

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

import contextlib
import dataclasses
import itertools
from collections.abc import Callable

import numpy as np
from hypothesis import strategies as st

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta.optim import SGD, Adam

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
        apply_step(step, values, lib)
    return values


def apply_step(step: Step, values: list, lib: str = "tm") -> None:
    """Append the step's value, computed from ``values`` (an in-place step changes one)."""
    values.append(op_of(step.op).call(lib)(*(values[i] for i in step.args), *step.params))


def _const(lib: str, a):
    return a if lib == "tm" else import_torch().from_numpy(np.asarray(a))


# --- derivatives in either library (the tests' harness) ----------------------------------------


def leaves(program: Program) -> list:
    """The program's inputs as tinymeta leaves that require grad (their memory layout kept)."""
    return [tm.tensor(x.copy(order="K"), requires_grad=True) for x in program.inputs]


# PyTorch 2.13 fails some third derivatives with an error of its own: mse_loss's double
# backward, with a target that requires grad, writes into one of its symbolic zero tensors.
TORCH_ZERO_TENSOR_BUG = "ZeroTensors are immutable"


def to_numpy(t) -> np.ndarray:
    if isinstance(t, tm.Tensor):
        return t.numpy()
    if t._is_zerotensor():  # PyTorch's symbolic zeros: reading their memory crashed the process
        return np.zeros(tuple(t.shape))
    return t.detach().numpy()


def _grads(lib: str, out, xs, create_graph: bool) -> list:
    """d out / d xs in ``lib``, zeros where out does not depend on an input."""
    if lib == "tm":
        if not out.requires_grad:
            return [tm.zeros_like(x) for x in xs]
        gs = tm.grad(out, xs, create_graph=create_graph, allow_unused=True)
        return [tm.zeros_like(x) if g is None else g for x, g in zip(xs, gs)]
    torch = import_torch()
    if not out.requires_grad:
        return [torch.zeros_like(x) for x in xs]
    gs = torch.autograd.grad(out, xs, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, gs)]


def derivatives(program: Program, lib: str, directions) -> list:
    """[value, first, second, third derivatives], each a list of arrays per input: the second
    and third as gradients of <previous gradients, direction> (random directions)."""
    if lib == "tm":
        xs = leaves(program)
    else:
        xs = [import_torch().tensor(x, requires_grad=True) for x in program.inputs]
    out = run(program, xs, lib)
    found = [[to_numpy(out)]]
    for order, vs in enumerate(directions, start=1):
        gs = _grads(lib, out, xs, create_graph=order < len(directions))
        found.append([to_numpy(g) for g in gs])
        if order < len(directions):
            out = sum((g * _const(lib, v)).sum() for g, v in zip(gs, vs))
    return found


def train(program, optimizer: str, second_order: bool, batches, captured: bool):
    """Three optimizer steps on the program's loss at (parameters + batch), or, with
    ``second_order``, at the parameters after one inner gradient step on that loss (MAML's
    meta-loss: its backward differentiates the inner gradient). Returns, after each step, the
    loss and the squared norm of the gradients (both returned by the step), the parameters
    and the gradients."""
    params = leaves(program)
    opt = SGD(params, lr=1e-2, momentum=0.9) if optimizer == "sgd" else Adam(params, lr=1e-2)

    def step(*batch):
        opt.zero_grad()
        xs = [p + d for p, d in zip(params, batch)]
        if second_order:
            inner = tm.grad(run(program, xs), params, create_graph=True, allow_unused=True)
            xs = [x if g is None else x - 0.1 * g for x, g in zip(xs, inner)]
        loss = run(program, xs)
        loss.backward()
        opt.step()
        # the step's own reading of the gradients after the update, as a logger would
        return loss, sum(((p.grad * p.grad).sum() for p in params if p.grad is not None), loss * 0)

    call = tm.capture(step) if captured else step
    history = []
    for batch in batches:
        loss, grad_square = call(*(tm.tensor(d) for d in batch))
        grads = [None if p.grad is None else p.grad.numpy().copy() for p in params]
        losses = (loss.numpy().copy(), grad_square.numpy().copy())
        history.append((losses, [p.numpy().copy() for p in params], grads))
    return history, call


def assert_same_history(eager: list, replayed: list) -> None:
    """Two histories from ``train``: equal bit for bit (inf and nan equal to themselves)."""
    for (returned_e, params_e, grads_e), (returned_r, params_r, grads_r) in zip(eager, replayed):
        for a, b in zip(returned_e, returned_r):
            assert np.array_equal(a, b, equal_nan=True)
        for a, b in zip(params_e, params_r):
            assert np.array_equal(a, b, equal_nan=True)
        for a, b in zip(grads_e, grads_r):
            assert (a is None) == (b is None)
            assert a is None or np.array_equal(a, b, equal_nan=True)


def backward_grads(program, forced_nodes: bool) -> list:
    """First-order .grad of every input after a plain backward. ``forced_nodes``: under
    detect_anomaly, whose forward hook turns off function.arrays_only_on_host, so every backward
    rule builds its gradient through Function.apply."""
    xs = leaves(program)
    with tm.autograd.detect_anomaly() if forced_nodes else contextlib.nullcontext():
        run(program, xs).backward()
    return [None if x.grad is None else x.grad.numpy() for x in xs]


def assert_same_grads(fast, slow) -> None:
    for a, b in zip(fast, slow):
        assert (a is None) == (b is None)
        if a is not None:
            assert np.array_equal(a, b), np.max(np.abs(a - b))


def random_directions(program: Program, seed: int, orders: int = 3) -> list:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(x.shape) for x in program.inputs] for _ in range(orders)]


def assert_derivatives_match(ours: list, theirs: list) -> None:
    """Derivatives (from ``derivatives``) equal to rtol 1e-9 (the summation order differs),
    and an absolute tolerance relative to the largest entry: 1e-11 for values and gradients,
    1e-10 for the second and third derivatives, whose small entries are sums of larger terms
    that cancel (a third derivative of 2.3e-4 differed by 5e-11 among entries up to 3.4)."""
    for order, (mine, ref) in enumerate(zip(ours, theirs)):
        atol = 1e-11 if order < 2 else 1e-10
        for i, (a, b) in enumerate(zip(mine, ref)):
            assert a.shape == b.shape, (order, i, a.shape, b.shape)
            scale = 1.0 + np.max(np.abs(b), initial=0.0)
            np.testing.assert_allclose(
                a, b, rtol=1e-9, atol=atol * scale, err_msg=f"order {order}, input {i}"
            )


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


# --- programs with in-place steps --------------------------------------------------------------
#
# An in-place step changes an earlier value's memory (``y += v``, ``y.mul_(v)``, ``y[idx] = v``,
# ``y.copy_(v)``, ``y.zero_()`` ...) and makes a new value that is the same tensor: later steps
# that name either index see the changed values, in both libraries. Its ``args[0]`` is the
# target, always a computed value (never an input: both libraries refuse in-place changes of a
# leaf that requires grad); the other args are operands.
#
# tinymeta refuses what it cannot differentiate faithfully (a change of memory that a view
# shares, of a tensor a graph saved, or used before by a node that backward reaches; repeated
# integer indices) where PyTorch may give a number: the tests accept a clear refusal or the
# same numbers. Targets are drawn so that most programs are not refused: usually a value that
# owns its memory and that nothing has read since it was last written.
#
# Kept out, because the libraries' aliasing differs (NumPy's rules, documented in
# docs/autograd-rules.md): a target related by view ops (indexing, reshape, transpose, ...) to a
# value whose memory it does not share in tinymeta; PyTorch may make a view there (``x[0]`` of
# a 1-D tensor, a reshape of a column-major input) and its change would reach the other value.


@dataclasses.dataclass(frozen=True)
class InplaceOp:
    pick: Callable  # (draw, shapes, target) -> (operand indices, params) or None
    tm: Callable  # (target, *operands, *params) -> the target, changed in place
    torch: Callable  # the same in PyTorch

    def call(self, lib: str) -> Callable:
        return self.tm if lib == "tm" else self.torch


def _fits_into(shape, target) -> bool:
    """An operand of ``shape`` broadcasts into ``target`` (never the other way)."""
    return _broadcasts(shape, target) and np.broadcast_shapes(shape, target) == tuple(target)


def pick_operand(draw, shapes, target):
    j = _choose(draw, [j for j, s in enumerate(shapes) if _fits_into(s, shapes[target])])
    return None if j is None else ((j,), ())


def pick_no_operand(draw, shapes, target):
    return (), ()


SCALARS = (-1.5, -0.5, 0.5, 2.0)


def pick_number(draw, shapes, target):
    return (), (draw(st.sampled_from(SCALARS)),)


def pick_scalar_tensor(draw, shapes, target):
    j = _choose(draw, [j for j, s in enumerate(shapes) if s == ()])
    return None if j is None else ((j,), ())


def _basic_spec(draw, shape):
    """An index of ints, slices, None and Ellipsis for a tensor of ``shape``, or None."""
    if not shape:
        return (Ellipsis,) if draw(st.booleans()) else None
    picked = pick_basic_index(draw, [shape])
    return picked[1][0]


def _slot_shape(shape, spec):
    return np.empty(shape)[_tm_index(spec)].shape


def pick_setitem(draw, shapes, target):
    """y[spec] = v: basic indices, v broadcast into the slot."""
    spec = _basic_spec(draw, shapes[target])
    if spec is None:
        return None
    slot = _slot_shape(shapes[target], spec)
    j = _choose(draw, [j for j, s in enumerate(shapes) if _fits_into(s, slot)])
    return None if j is None else ((j,), (spec,))


def pick_setitem_number(draw, shapes, target):
    spec = _basic_spec(draw, shapes[target])
    return None if spec is None else ((), (spec, draw(st.sampled_from(SCALARS))))


def _array_spec(draw, shape, repeated: bool):
    """(:, ..., [i, j, k]) along one axis: unique indices, or one index twice (``repeated``)."""
    if not shape:
        return None
    axis = draw(st.integers(0, len(shape) - 1))
    d = shape[axis]
    if repeated:
        first = draw(st.integers(-d, d - 1))
        others = draw(st.lists(st.integers(-d, d - 1), max_size=3))
        twin = first % d - d if draw(st.booleans()) else first  # the same element, maybe negative
        index = draw(st.permutations([first, twin, *others]))
    else:
        index = draw(st.permutations(range(d)))[: draw(st.integers(1, d))]
        index = [i - d if draw(st.booleans()) else i for i in index]  # negative ones too
    return (slice(None),) * axis + (list(index),)


def _pick_setitem_array(repeated: bool):
    def pick(draw, shapes, target):
        spec = _array_spec(draw, shapes[target], repeated)
        if spec is None:
            return None
        slot = _slot_shape(shapes[target], spec)
        j = _choose(draw, [j for j, s in enumerate(shapes) if _fits_into(s, slot)])
        return None if j is None else ((j,), (spec,))

    return pick


def _iadd(y, v):
    y += v
    return y


def _isub(y, v):
    y -= v
    return y


def _imul(y, v):
    y *= v
    return y


def _idiv(y, v):
    y /= _sq(v)  # divisor >= 1
    return y


def _set(y, v, spec):
    y[spec] = v
    return y


def _set_number(y, spec, c):
    y[spec] = c
    return y


def _tm_set_array(y, v, spec):
    y[_tm_index(spec)] = v
    return y


def _torch_set_array(y, v, spec):
    y[_torch_index(spec)] = v
    return y


def _same(f):  # one call for both libraries: their in-place APIs agree here
    return f, f


# One line per in-place kind: (operands and parameters, tinymeta, PyTorch). Hypothesis draws
# the first ones more often (and shrinks towards add_): the kinds are mixed near the top.
# fmt: off
INPLACE_OPS = {
    "add_": InplaceOp(pick_operand, *_same(lambda y, v: y.add_(v))),
    "setitem": InplaceOp(pick_setitem, *_same(_set)),
    "mul_": InplaceOp(pick_operand, *_same(lambda y, v: y.mul_(v))),
    "setitem_array": InplaceOp(_pick_setitem_array(False), _tm_set_array, _torch_set_array),
    "copy_": InplaceOp(pick_operand, *_same(lambda y, v: y.copy_(v))),
    "iadd": InplaceOp(pick_operand, *_same(_iadd)),
    "setitem_number": InplaceOp(pick_setitem_number, *_same(_set_number)),
    "fill_": InplaceOp(pick_number, *_same(lambda y, c: y.fill_(c))),
    "sub_": InplaceOp(pick_operand, *_same(lambda y, v: y.sub_(v))),
    "imul": InplaceOp(pick_operand, *_same(_imul)),
    "zero_": InplaceOp(pick_no_operand, *_same(lambda y: y.zero_())),
    "div_": InplaceOp(pick_operand, *_same(lambda y, v: y.div_(_sq(v)))),  # divisor >= 1
    "idiv": InplaceOp(pick_operand, *_same(_idiv)),
    "add_alpha": InplaceOp(pick_operand, *_same(lambda y, v: y.add_(v, alpha=-0.5))),
    "isub": InplaceOp(pick_operand, *_same(_isub)),
    "add_number": InplaceOp(pick_number, *_same(lambda y, c: y.add_(c))),
    "mul_number": InplaceOp(pick_number, *_same(lambda y, c: y.mul_(c))),
    "div_number": InplaceOp(pick_number, *_same(lambda y, c: y.div_(c))),
    "iadd_number": InplaceOp(pick_number, *_same(_iadd)),
    "imul_number": InplaceOp(pick_number, *_same(_imul)),
    "pow_": InplaceOp(pick_no_operand, *_same(lambda y: y.pow_(2))),
    "fill_tensor": InplaceOp(pick_scalar_tensor, *_same(lambda y, v: y.fill_(v))),  # 0-d value
}
# fmt: on
INPLACE_NAMES = list(INPLACE_OPS)
# Integer indices that name an element twice: tinymeta refuses to differentiate the assignment.
REPEATED_INDEX_OP = InplaceOp(_pick_setitem_array(True), _tm_set_array, _torch_set_array)
ALL_INPLACE_OPS = {**INPLACE_OPS, "setitem_repeated": REPEATED_INDEX_OP}

# Ops whose output may be a view of their input in PyTorch or in tinymeta.
VIEW_OPS = set(
    "index reshape transpose T swapaxes broadcast_to squeeze unsqueeze flatten einsum".split()
)
# Ops whose backward reads their output (in tinymeta): an in-place change of it is refused at
# backward, as in PyTorch. Drawn as targets less often, so that most programs are compared.
SAVES_OUTPUT = set("div exp log_softmax max min pow_tensor sigmoid softmax sqrt tanh".split())


def op_of(name: str):
    """The table entry of a step's op: pure (OPS) or in place (ALL_INPLACE_OPS)."""
    return OPS[name] if name in OPS else ALL_INPLACE_OPS[name]


class _Tracker:
    """What the generator knows about the values of a program being drawn: the tinymeta
    tensors (no grad; in-place steps change them, views see it), which values are one tensor,
    which are related by view ops, and which tensors have been read since their last change."""

    def __init__(self, inputs):
        self.n_inputs = len(inputs)
        self.tensors = [tm.tensor(x.copy(order="K")) for x in inputs]
        self.owner = list(range(len(inputs)))  # value -> the first value of its tensor
        self.group = list(range(len(inputs)))  # value -> a representative of its view family
        self.read = set()  # owners read since their last change
        self.writer = ["input"] * len(inputs)  # owner -> the op that last wrote it

    def shapes(self):
        return [t.shape for t in self.tensors]

    def _family(self, i):
        root = self.group[i]
        while self.group[root] != root:
            root = self.group[root]
        return root

    def add_pure(self, name, args, y):
        self.read.update(self.owner[i] for i in args)
        k = len(self.tensors)
        self.tensors.append(y)
        self.owner.append(k)
        self.group.append(k)
        self.writer.append(name)
        if name in VIEW_OPS and len(args) == 1:
            self.group[k] = self._family(args[0])

    def add_inplace(self, target, operands):
        self.read.update(self.owner[i] for i in operands)
        self.read.discard(self.owner[target])  # just written
        self.writer[self.owner[target]] = "in place"
        self.tensors.append(self.tensors[target])
        self.owner.append(self.owner[target])
        self.group.append(self.group[target])
        self.writer.append(None)  # (read through its owner)

    def _relatives(self, i):
        """Other tensors related to value i by view ops."""
        family = self._family(i)
        return [
            j
            for j in range(len(self.tensors))
            if self.owner[j] == j and j != self.owner[i] and self._family(j) == family
        ]

    def same_aliasing(self, i) -> bool:
        """Every relative shares memory with value i in tinymeta (then PyTorch's views and
        tinymeta's agree on what a change of i reaches)."""
        mine = self.tensors[i].data
        return all(np.shares_memory(mine, self.tensors[j].data) for j in self._relatives(i))

    def fresh(self, i) -> bool:
        """Value i owns its memory (no view made by the program, nor by the op inside, as
        matmul of a 1-D operand or logsumexp make) and nothing has read it since its last
        change."""
        own = self.tensors[i].data.base is None and not self._relatives(i)
        return own and self.owner[i] not in self.read

    def targets(self, fresh_only: bool, keeps_output: bool = True):
        """Candidate targets: every computed value whose aliasing the libraries agree on, or
        (``fresh_only``) the fresh ones; ``keeps_output=False``: not last written by an op
        that saved its output."""
        computed = range(self.n_inputs, len(self.tensors))
        if not fresh_only:
            return [i for i in computed if self.same_aliasing(i)]
        fresh = [i for i in computed if self.fresh(i)]
        if keeps_output:
            return fresh
        return [i for i in fresh if self.writer[self.owner[i]] not in SAVES_OUTPUT]


def _within_limit(array) -> bool:
    return array.size > 0 and bool(np.all(np.abs(array) <= LIMIT))


def _draw_pure_step(draw, tracker, names):
    name = draw(st.sampled_from(names))
    op = OPS[name]
    picked = op.pick(draw, tracker.shapes())
    if picked is None or picked[0] is None or None in picked[0]:
        return None
    args, params = picked
    if not op.ok(*(tracker.tensors[i].numpy() for i in args), *params):
        return None
    with tm.no_grad():
        y = op.tm(*(tracker.tensors[i] for i in args), *params)
    if y.ndim > MAX_NDIM or y.size > MAX_SIZE or not _within_limit(y.numpy()):
        return None
    tracker.add_pure(name, args, y)
    return Step(name, tuple(args), tuple(params))


def _draw_inplace_step(draw, tracker, names, fresh_only):
    # Mostly fresh targets, mostly not saved by their creator. Drawn by Hypothesis (which
    # favours 0: the side of fewer refusals), not from the program's seed, which Hypothesis
    # repeats across programs: refusals would come in clusters.
    fresh = fresh_only or draw(st.integers(0, 19)) < 17
    targets = tracker.targets(fresh, keeps_output=draw(st.integers(0, 9)) >= 8)
    if not targets:
        return None
    target = draw(st.sampled_from(targets))
    name = draw(st.sampled_from(names))
    op = ALL_INPLACE_OPS[name]
    picked = op.pick(draw, tracker.shapes(), target)
    if picked is None:
        return None
    operands, params = picked
    y = tracker.tensors[target]
    with tm.no_grad():
        trial = op.tm(tm.tensor(y.numpy().copy()), *(tracker.tensors[j] for j in operands), *params)
        if not _within_limit(trial.numpy()):
            return None
        try:
            op.tm(y, *(tracker.tensors[j] for j in operands), *params)
        except ValueError:  # a read-only view (broadcast_to): NumPy refuses the write
            return None
    tracker.add_inplace(target, operands)
    return Step(name, (target, *operands), tuple(params))


@st.composite
def inplace_programs(
    draw, min_steps: int = 3, max_steps: int = 12, inplace_ops=None, fresh_only: bool = False
):
    """A random Program whose steps are pure (OPS) or in place (``inplace_ops``, by default
    INPLACE_OPS), about one in three in place; see the comment above INPLACE_OPS. The first step
    is pure (an in-place step needs a computed target). ``fresh_only``: every target owns its
    memory and is unread since its last change."""
    names = list(inplace_ops) if inplace_ops is not None else INPLACE_NAMES
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    inputs = [rng.standard_normal(s) for s in input_shapes(rng)]
    if draw(st.booleans()):
        inputs = [np.asfortranarray(x) for x in inputs]
    tracker = _Tracker(inputs)
    steps = []
    wanted = draw(st.integers(min_steps, max_steps))
    for _ in range(6 * max_steps):
        if len(steps) == wanted:
            break
        if steps and rng.random() < 0.4:
            step = _draw_inplace_step(draw, tracker, names, fresh_only)
        else:
            step = _draw_pure_step(draw, tracker, OP_NAMES)
        if step is not None:
            steps.append(step)
    for _ in range(4):  # none drawn (short programs often have none): one at the end
        if not steps or any(step.op in ALL_INPLACE_OPS for step in steps):
            break
        step = _draw_inplace_step(draw, tracker, names, fresh_only)
        if step is not None:
            steps.append(step)
    last = len(tracker.tensors) - 1
    extra = draw(st.lists(st.integers(0, last - 1), max_size=2, unique=True)) if last else []
    ends = (last, *extra)
    weights = [rng.standard_normal(tracker.tensors[i].shape) for i in ends]
    return Program(inputs, steps, ends, weights)
