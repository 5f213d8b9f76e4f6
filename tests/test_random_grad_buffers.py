"""Random sessions of gradient calls on random programs, replayed in tinymeta and in PyTorch.

For each program of ``random_programs.programs()`` a session is drawn: hooks on leaves and on
intermediate values (that record the gradient, scale it, or multiply it by the value itself),
then two or three ``backward`` calls (from the scalar, or from a non-scalar value with a random
``gradient=``; with or without ``create_graph``; ``.grad`` of some leaves reset to None before a
call; references to ``.grad`` held across calls), then ``tm.grad`` with several outputs and
inputs that are intermediate values. Every observable is compared with PyTorch (float64, rtol
1e-9): ``.grad`` after each call, whether a held reference is still ``.grad`` and what it holds,
what each hook saw, the gradient of ``sum(x.grad * v)`` after a ``create_graph`` backward, the
gradients ``grad`` returns (and their own gradients). In tinymeta every gradient handed out is
checked to be writable and apart (docs/autograd-rules.md, "Gradient buffers"): no memory shared
with another gradient handed out, a gradient passed in or a program value, and writing into
one changes nothing else (another gradient, a value, an argument a hook kept), nor a later
backward.

Deliberate differences, not compared (docs/autograd-rules.md): a plain backward into a ``.grad``
that a ``create_graph`` backward made gives a new tensor in tinymeta (PyTorch writes into it);
a hook that changes the gradient of a value that ``grad`` is asked about (PyTorch returns the
changed gradient only when no other input lies behind the value, tinymeta always does), so such
values are not asked about; hooks during a gradient of gradients, which are turned off (see
_gradient_of_sum); a hook that one library runs where the other records no node, if it saw
zeros; the hooks of ``grad``'s outputs from which no input asked about can be reached (PyTorch
runs them, tinymeta runs no node there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import warnings

import numpy as np
import pytest
import random_programs as rp
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

import tinymeta as tm

HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="needs PyTorch (the comparison library)")
FEW = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SKIP = "not compared: the libraries differ by design"
HOOK_KINDS = ("record", "scale", "times_value")
SCALES = (-2.0, 0.5, 3.0)


# --- the session ------------------------------------------------------------------------------


@dataclasses.dataclass
class BackwardCall:
    root: int | None  # a value of the program, or None: the program's scalar
    gradient: np.ndarray | None  # the gradient= of a non-scalar root
    create_graph: bool
    resets: tuple  # (leaf, "none" or "zero_"): x.grad = None, or x.grad.zero_() before the call
    removals: tuple  # hooks removed before the call (handle.remove())
    under_no_grad: bool  # called inside no_grad(): create_graph must record all the same
    directions: list  # one array per leaf: d sum(x.grad * v) / d inputs after create_graph


@dataclasses.dataclass
class GradCall:
    outputs: tuple  # values of the program
    grad_outputs: list
    inputs: tuple  # values of the program (an index may repeat)
    create_graph: bool
    directions: list  # one array per input: d sum(g * v) / d leaves after create_graph


@dataclasses.dataclass
class Session:
    hooks: list  # (value, kind, scale)
    calls: list  # BackwardCall
    grad_call: GradCall
    retained: tuple = ()  # computed values whose gradient retain_grad() keeps in .grad


def _shapes_and_same_tensors(program):
    """The shape of every value, and the values that PyTorch returns as an earlier value's
    tensor itself (its flatten of a 1-D tensor): no hook nor grad input goes there."""
    with tm.no_grad():
        shapes = [v.shape for v in rp.run_values(program, [tm.tensor(x) for x in program.inputs])]
    torch = rp.import_torch()
    values = rp.run_values(program, [torch.tensor(x) for x in program.inputs], "torch")
    same = {i for i, v in enumerate(values) if any(v is e for e in values[:i])}
    return shapes, same


def draw_session(program, seed: int) -> Session:
    rng = np.random.default_rng(seed)
    shapes, same = _shapes_and_same_tensors(program)
    n, n_leaves = len(shapes), len(program.inputs)
    usable = [i for i in range(n) if i not in same]
    hooks = [
        (int(rng.choice(usable)), str(rng.choice(HOOK_KINDS)), float(rng.choice(SCALES)))
        for _ in range(rng.integers(0, 4))
    ]

    def directions(indices):
        return [rng.standard_normal(shapes[i]) for i in indices]

    calls = []
    for _ in range(rng.integers(2, 4)):
        root = None if rng.random() < 0.5 else int(rng.choice(program.ends))
        gradient = None if root is None else rng.standard_normal(shapes[root])
        resets = tuple(
            (i, str(rng.choice(["none", "zero_"]))) for i in range(n_leaves) if rng.random() < 0.3
        )
        removals = tuple(k for k in range(len(hooks)) if rng.random() < 0.15)
        create_graph = bool(rng.random() < 0.5)
        under_no_grad = bool(rng.random() < 0.25)
        calls.append(
            BackwardCall(
                root,
                gradient,
                create_graph,
                resets,
                removals,
                under_no_grad,
                directions(range(n_leaves)),
            )
        )
    changed = {i for i, kind, _ in hooks if kind != "record" and i >= n_leaves}
    askable = [i for i in usable if i not in changed]
    # not a value that PyTorch's flatten returns as a leaf itself (whose hooks it runs)
    computed = [i for i in range(n_leaves, n) if i not in same] or usable
    outputs = tuple(int(i) for i in rng.choice(computed, size=rng.integers(1, 3)))
    inputs = tuple(int(i) for i in rng.choice(askable, size=rng.integers(1, 4)))
    grad_call = GradCall(
        outputs,
        [rng.standard_normal(shapes[i]) for i in outputs],
        inputs,
        bool(rng.random() < 0.5),
        directions(inputs),
    )
    retained = tuple(sorted({int(i) for i in rng.choice(computed, size=rng.integers(0, 3))}))
    retained = tuple(i for i in retained if i >= n_leaves)
    return Session(hooks, calls, grad_call, retained)


# --- replaying it in either library -----------------------------------------------------------


class Lib:
    """The few calls that differ between the two libraries."""

    def __init__(self, name: str):
        self.name = name
        self.torch = rp.import_torch() if name == "torch" else None
        self.hooks_on = True  # off while a gradient of gradients is taken (see _gradient_of_sum)
        self.kept = []  # (the gradient a hook was handed, its values then)
        self.handles = []  # of the hooks of the last forward, in the session's order

    def leaves(self, program):
        if self.torch is None:
            return rp.leaves(program)
        return [self.torch.tensor(x, requires_grad=True) for x in program.inputs]

    def const(self, a):
        return tm.tensor(a.copy()) if self.torch is None else self.torch.tensor(a)

    def no_grad(self):
        return tm.no_grad() if self.torch is None else self.torch.no_grad()

    def grad(self, outputs, inputs, **kwargs):
        grad = tm.grad if self.torch is None else self.torch.autograd.grad
        return grad(outputs, inputs, allow_unused=True, **kwargs)


def _array(t):
    return None if t is None else rp.to_numpy(t).copy()


def _make_hook(lib, kind: str, scale: float, value, log: list, key):
    def hook(g):
        if not lib.hooks_on:
            return None
        log.append((key, _array(g)))
        lib.kept.append((g, _array(g)))  # a hook that keeps its argument, as loggers do
        if kind == "scale":
            return g * scale
        if kind == "times_value":  # a gradient that depends on the value: recorded only
            return g * value  # when the gradient is differentiable (create_graph)
        return None

    return hook


def _forward(program, session, lib, xs, log, tag):
    values = rp.run_values(program, xs, lib.name)
    lib.handles = [
        values[i].register_hook(_make_hook(lib, kind, scale, values[i], log, (tag, k)))
        for k, (i, kind, scale) in enumerate(session.hooks)
    ]
    for i in session.retained:
        if values[i].requires_grad:
            values[i].retain_grad()
    return values


def _hooks_seen(log) -> dict:
    """What each hook saw, by hook (the libraries may run independent branches in another
    order); the log is emptied."""
    seen = {}
    for key, g in log:
        seen.setdefault(key, []).append(g)
    log.clear()
    return seen


def _gradient_of_sum(lib, grads, directions, wrt):
    """d sum(g * v) / d wrt for the differentiable gradients ``grads`` (zeros where none is),
    with the hooks off: this backward runs through the graph of the first one too, whose
    routing through a hooked value is each library's own (tinymeta's logsumexp is made of
    ops that read its input; PyTorch's backward reads its output, so a hook on the output
    would change PyTorch's second derivative and not tinymeta's)."""
    terms = [
        (g * lib.const(v)).sum()
        for g, v in zip(grads, directions)
        if g is not None and g.requires_grad
    ]
    if not terms:
        return [np.zeros(x.shape) for x in wrt]
    lib.hooks_on = False
    try:
        gs = lib.grad(sum(terms[1:], terms[0]), wrt, retain_graph=True)
    finally:
        lib.hooks_on = True
    return [np.zeros(x.shape) if g is None else _array(g) for x, g in zip(wrt, gs)]


def replay(program, session: Session, name: str, checks=None) -> list:
    """Run the session in ``name``'s library; returns [(label, observation), ...]. ``checks``
    (tinymeta only) is called with what was handed out, to check the buffers."""
    lib = Lib(name)
    log: list = []
    seen: list = []

    def observe(label, value):
        seen.append((label, value))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's warning on backward(create_graph=True)
        try:
            xs = lib.leaves(program)
            values = _forward(program, session, lib, xs, log, "first")
            _backward_calls(program, session, lib, xs, values, log, observe, checks)
            values = _forward(program, session, lib, xs, log, "second")
            _grad_call(program, session, lib, xs, values, log, observe, checks)
        except RuntimeError as e:
            observe("error", str(e))
    if name == "tm":  # later backward calls and writes into .grad never reached them
        for i, (g, then) in enumerate(lib.kept):
            assert np.array_equal(_array(g), then, equal_nan=True), f"kept hook argument {i}"
    return seen


def _backward_calls(program, session, lib, xs, values, log, observe, checks):
    scalar = rp.scalar_of(program, values, lib.name)
    plain = [True] * len(xs)  # .grad made by backward calls without create_graph only
    for k, call in enumerate(session.calls):
        for k_hook in call.removals:
            lib.handles[k_hook].remove()
        for i, how in call.resets:
            _reset(lib, xs[i], how, plain[i])
            plain[i] = plain[i] or how == "none"
        held = [x.grad for x in xs]
        held_before = [_array(h) for h in held]
        root = scalar if call.root is None else values[call.root]
        gradient = None if call.gradient is None else lib.const(call.gradient)
        last = k == len(session.calls) - 1
        with lib.no_grad() if call.under_no_grad else contextlib.nullcontext():
            root.backward(gradient, retain_graph=not last, create_graph=call.create_graph)
        plain = [p and not call.create_graph for p in plain]
        observe(f"call {k}: hooks", _hooks_seen(log))
        for i, (x, h, before) in enumerate(zip(xs, held, held_before)):
            observe(f"call {k}: leaf {i} .grad", _array(x.grad))
            if h is not None:
                _observe_held(lib, call, x, h, before, f"call {k}: leaf {i}", observe)
        for i, x in enumerate(xs):
            if plain[i] and x.grad is not None:  # a hook's g * x records nothing there
                observe(f"call {k}: leaf {i} .grad requires grad", x.grad.requires_grad)
        retained = [values[i] for i in session.retained]
        for i, v in zip(session.retained, retained):
            observe(f"call {k}: retained value {i} .grad", _array(v.grad))
        if checks is not None:
            checks([x.grad for x in xs] + [v.grad for v in retained], values, [gradient], held)
        if call.create_graph and not last:
            # Its walk may pass retained values in one library only (see _gradient_of_sum):
            # what it adds to their .grad is not compared.
            kept = [v.grad for v in retained]
            of_grads = _gradient_of_sum(lib, [x.grad for x in xs], call.directions, xs)
            observe(f"call {k}: d sum(.grad * v)", of_grads)
            for v, g in zip(retained, kept):
                v.grad = g
    if lib.name == "tm":  # the grad call below must not see these writes
        retained = [values[i].grad for i in session.retained]
        _write_into_each([x.grad for x in xs] + retained, values)


def _reset(lib, x, how: str, plain: bool) -> None:
    """x.grad = None, or x.grad.zero_() in place (optimizers' zero_grad(set_to_none=False) in
    PyTorch) where .grad has no graph (tinymeta refuses to change a computed .grad in place)."""
    if how == "none":
        x.grad = None
    elif plain and x.grad is not None:
        with lib.no_grad():
            x.grad.zero_()


def _observe_held(lib, call, x, held, before, label, observe):
    """Whether ``held`` (``x.grad`` before the call) is still ``x.grad``, and its values."""
    new_tensor_by_design = (  # where PyTorch writes into it
        lib.name == "tm" and held.grad_fn is not None and not call.create_graph
    ) and x.grad is not held
    if new_tensor_by_design:  # tinymeta leaves a differentiable .grad alone
        assert np.array_equal(_array(held), before), f"{label}: the held .grad changed"
        observe(f"{label} held is .grad", SKIP)
        observe(f"{label} held", SKIP)
    else:
        observe(f"{label} held is .grad", x.grad is held)
        observe(f"{label} held", _array(held))


def _grad_call(program, session, lib, xs, values, log, observe, checks):
    call = session.grad_call
    outputs = [values[i] for i in call.outputs]
    grad_outputs = [lib.const(g) for g in call.grad_outputs]
    inputs = [values[i] for i in call.inputs]
    grads = lib.grad(
        outputs,
        inputs,
        grad_outputs=grad_outputs,
        create_graph=call.create_graph,
        retain_graph=True,
    )
    observe("grad: hooks", _hooks_seen(log))
    observe("grad", [None if g is None else _array(g) for g in grads])
    if checks is not None:
        checks(list(grads), values, grad_outputs, [])
    if call.create_graph:
        observe("grad: d sum(g * v)", _gradient_of_sum(lib, grads, call.directions, xs))
    if lib.name == "tm":
        _write_into_each(grads, values)
    # A later result, after tinymeta's gradients were overwritten: the scalar's backward.
    for x in xs:
        x.grad = None
    rp.scalar_of(program, values, lib.name).backward()
    observe("backward after grad: hooks", _hooks_seen(log))
    observe("backward after grad: .grad", [_array(x.grad) for x in xs])


def _write_into_each(grads, values):
    """Write NaN into each gradient (its memory, through NumPy) and check that no other
    gradient nor any program value changed."""
    present = [g for g in grads if g is not None]
    for g in present:
        others = [(h, _array(h)) for h in present if h is not g] + [(v, _array(v)) for v in values]
        g.numpy()[...] = np.nan
        for t, before in others:
            assert np.array_equal(_array(t), before, equal_nan=True), "a write reached another"


# --- tinymeta's buffers -------------------------------------------------------------------------


def check_buffers(grads, values, passed_in, held):
    """Every gradient handed out is writable, and shares memory with no other one handed out,
    no gradient passed in, no program value and no .grad held from before (if not the same
    tensor)."""
    arrays = [None if g is None else g.numpy() for g in grads]
    others = [v.numpy() for v in values] + [g.numpy() for g in passed_in if g is not None]
    for i, a in enumerate(arrays):
        if a is None:
            continue
        assert a.flags.writeable, f"gradient {i} is read-only"
        for j, b in enumerate(arrays[:i]):
            assert b is None or not np.shares_memory(a, b), f"gradients {j} and {i} share memory"
        for o in others:
            assert not np.shares_memory(a, o), f"gradient {i} shares memory with a value"
        for h in held:
            if h is not None and h is not grads[i]:
                assert not np.shares_memory(a, h.numpy()), f"gradient {i} shares a held .grad"


# --- comparing ----------------------------------------------------------------------------------


def _assert_close(a, b, label):
    if a is SKIP or b is SKIP:
        return
    if isinstance(b, dict):  # what each hook saw (see _hooks_seen)
        assert isinstance(a, dict), label
        for key in set(a) ^ set(b):  # a hook that ran in one library only: where the other
            # recorded no node (relu's mask is a constant in tinymeta, a node in PyTorch)
            assert not np.any((a if key in a else b)[key]), f"{label}: hook {key} saw non-zeros"
        for key in set(a) & set(b):
            assert len(a[key]) == len(b[key]), (label, key, len(a[key]), len(b[key]))
            for x, y in zip(a[key], b[key]):
                _assert_close(x, y, f"{label}, hook {key}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), label
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{label} [{i}]")
    elif isinstance(b, np.ndarray) or isinstance(a, np.ndarray):
        if a is None or b is None:  # unused: one library may say None where the other says 0
            assert not np.any(a if b is None else b), label
            return
        assert a.shape == b.shape, (label, a.shape, b.shape)
        scale = 1.0 + np.max(np.abs(b), initial=0.0)
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10 * scale, err_msg=label)
    else:
        assert a == b, (label, a, b)


def _without_unreached_output_hooks(ours: dict, theirs: dict, session) -> dict:
    """PyTorch's grad runs the hooks of its outputs even where no input asked about lies
    behind them; tinymeta's runs only the nodes that lead to one: those calls are left out."""
    outputs = session.grad_call.outputs
    return {
        key: seen
        for key, seen in theirs.items()
        if key in ours or session.hooks[key[1]][0] not in outputs
    }


def compare_session(program, seed: int) -> None:
    session = draw_session(program, seed)
    theirs = replay(program, session, "torch")
    if any(label == "error" and rp.TORCH_ZERO_TENSOR_BUG in v for label, v in theirs):
        reject()  # PyTorch's own bug (see random_programs.TORCH_ZERO_TENSOR_BUG)
    ours = replay(program, session, "tm", checks=check_buffers)
    for (label_a, a), (label_b, b) in zip(ours, theirs):
        assert label_a == label_b, (label_a, label_b, a if label_a == "error" else b)
        if label_a == "grad: hooks":
            b = _without_unreached_output_hooks(a, b, session)
        _assert_close(a, b, label_a)
    assert len(ours) == len(theirs), (ours[len(theirs) :], theirs[len(ours) :])


@needs_torch
@FEW
@given(rp.programs(), st.integers(0, 2**32 - 1))
def test_gradient_sessions_match_pytorch(program, seed):
    compare_session(program, seed)


@needs_torch
@pytest.mark.slow
@MANY
@given(rp.programs(), st.integers(0, 2**32 - 1))
def test_many_gradient_sessions_match_pytorch(program, seed):
    compare_session(program, seed)
