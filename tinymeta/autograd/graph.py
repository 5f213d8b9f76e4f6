"""Reading a recorded graph: the walk and the facts the instruments share.

A graph is tensors and Functions. From a tensor, ``grad_fn`` leads to the
Function that made it (None for a leaf); from a Function, ``inputs`` lead to
the tensors it consumed and ``outputs`` (weak references) to those it made.
A backward pass that does not retain the graph *frees* each node it runs:
``inputs`` becomes None and only ``freed_edges`` (weak references to the
inputs, strong ones to their creators) say where the node led.

Nothing here changes a graph; every instrument (``tm.viz``, ``trace``,
``explain``, ``graph_memory``) reads graphs through these few functions.
"""

from __future__ import annotations

import functools
import inspect
import re

from tinymeta.function import Function
from tinymeta.tensor import Tensor


def as_tensors(tensors) -> tuple[list, dict]:
    """``(tensors, names)`` from a Tensor, a sequence of them, or a dict ``{name: tensor}``.

    ``names`` maps ``id(tensor)`` to the dict key, so callers can label the
    tensors they were given (``{"loss": loss, "dL/dw": g}``).
    """
    if isinstance(tensors, Tensor):
        return [tensors], {}
    if isinstance(tensors, dict):
        items = list(tensors.items())
    else:
        items = [(None, t) for t in tensors]
    out, names = [], {}
    for name, t in items:
        if t is None:  # e.g. a gradient that grad(..., allow_unused=True) left out
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"expected tensors, got a {type(t).__name__}")
        out.append(t)
        if name is not None:
            names[id(t)] = str(name)
    return out, names


def input_edges(fn: Function) -> list[tuple]:
    """``(input tensor or None, its creator Function or None)`` for each input of ``fn``.

    The tensor is None only when the node was freed by a backward pass and
    nothing else kept that input alive.
    """
    if fn.inputs is not None:
        return [(x, x.grad_fn) for x in fn.inputs]
    return [(ref(), creator) for ref, creator in fn.freed_edges]


def output_tensors(fn: Function) -> list:
    """The output tensors of ``fn`` (None for an output nobody holds any more)."""
    return [ref() for ref in fn.outputs]


def functions(tensors) -> list[Function]:
    """Every Function the tensors were computed through, oldest first.

    Sorted by generation, so each node comes after the nodes that made its
    inputs: the order in which the forward pass ran them (up to ties).
    Iterative, so a 100,000-op chain is fine.
    """
    roots, _ = as_tensors(tensors)
    seen: set[int] = set()
    found: list[Function] = []
    stack = [t.grad_fn for t in reversed(roots) if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        found.append(fn)
        for _, creator in reversed(input_edges(fn)):
            if creator is not None and id(creator) not in seen:
                stack.append(creator)
    found.sort(key=lambda f: f.generation)  # stable: ties keep the discovery order
    return found


def leaves(tensors) -> list[Tensor]:
    """The leaf tensors that require grad (parameters, inputs) the tensors depend on."""
    roots, _ = as_tensors(tensors)
    out, seen = [], set()
    candidates = [t for t in roots if t.grad_fn is None]
    for fn in functions(roots):
        candidates.extend(x for x, creator in input_edges(fn) if x is not None and creator is None)
    for t in candidates:
        if t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


# --- naming tensors -----------------------------------------------------------------------


def param_names(params) -> dict[int, str]:
    """``{id(tensor): name}`` from a Module (its ``named_parameters()``), a dict
    ``{name: tensor}`` or an iterable of ``(name, tensor)`` pairs; None gives ``{}``."""
    if params is None:
        return {}
    if hasattr(params, "named_parameters"):
        params = params.named_parameters()
    items = params.items() if isinstance(params, dict) else params
    return {id(t): str(name) for name, t in items if t is not None}


def number_tensors(nodes: list[Function], roots: list[Tensor]) -> dict[int, int]:
    """``{id(tensor): k}``: each tensor of the graph numbered in order of first appearance.

    The order is the forward's: node by node (oldest first), inputs then
    outputs, then any root not reached that way (a leaf). ``tm.viz`` and
    ``explain`` both number tensors this way, so ``t7`` means the same
    tensor in a drawing and in an explanation of the same graph.
    """
    numbers: dict[int, int] = {}
    for fn in nodes:
        for x, _ in input_edges(fn):
            if x is not None:
                numbers.setdefault(id(x), len(numbers))
        for y in output_tensors(fn):
            if y is not None:
                numbers.setdefault(id(y), len(numbers))
    for t in roots:
        numbers.setdefault(id(t), len(numbers))
    return numbers


# --- what a node keeps for its backward rule ----------------------------------------------

# ``self.output`` / ``self.outputs`` / ``self._held_outputs`` in a backward rule, but not
# ``self.output_term`` and the like.
_READS_OUTPUT = re.compile(r"self\.(output|outputs|_held_outputs)\b")


@functools.cache
def reads_output(cls: type) -> bool:
    """Does the backward rule of ``cls`` read the op's output (``self.output``)?

    An op says so with the class attribute ``saves_output = True`` (tanh, exp,
    sqrt, sigmoid, div, pow and max reuse their output instead of recomputing
    it). For an op that declares nothing (only ``Function``'s default), we read
    the source of its ``backward`` instead; a rule whose source is not
    available (defined in a REPL) then counts as not reading it.
    """
    for klass in cls.__mro__:
        if klass is Function or klass is object:
            break
        if "saves_output" in klass.__dict__:
            return bool(klass.__dict__["saves_output"])
    try:
        source = inspect.getsource(cls.backward)
    except (OSError, TypeError):
        return False
    return _READS_OUTPUT.search(source) is not None


def saved_arrays(fn: Function) -> list[tuple[str, object]]:
    """``(role, array)`` for each array the node keeps for its backward rule.

    The role is ``"input i"`` or ``"output j"``. Inputs count when the op's
    rule reads their values (``Function.saves_inputs``); outputs count when it
    reads ``self.output`` (``reads_output``). A node freed by backward keeps nothing.
    """
    if fn.inputs is None:
        return []
    saved = []
    if fn.saves_inputs:
        saved.extend((f"input {i}", x.data) for i, x in enumerate(fn.inputs))
    if reads_output(type(fn)):
        for j, y in enumerate(output_tensors(fn)):
            if y is not None:
                saved.append((f"output {j}", y.data))
    return saved


def unique_nbytes(arrays) -> int:
    """Total ``nbytes`` of the arrays, each array object counted once."""
    seen: dict[int, int] = {}
    for a in arrays:
        seen.setdefault(id(a), a.nbytes)
    return sum(seen.values())


@functools.cache
def formula(cls: type) -> str:
    """The math of an op: the first paragraph of its class docstring, on one line.

    ``Tanh`` gives ``"y = tanh(x);  gx = gy * (1 - y**2)."``. Subclasses without
    a docstring of their own use their parent op's (but never Function's).
    """
    for klass in cls.__mro__:
        if klass is Function or klass is object:
            break
        doc = klass.__dict__.get("__doc__")
        if doc and doc.strip():
            paragraph = inspect.cleandoc(doc).split("\n\n")[0]
            # Keep the double spaces docstrings use between forward and backward.
            return " ".join(line.strip() for line in paragraph.splitlines())
    return "(no formula: the op has no docstring)"


def describe_shape(shape: tuple) -> str:
    """``(3, 4)``, ``(5,)`` or ``()``."""
    return "(" + ", ".join(str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"


def format_bytes(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ``3.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """A plain-text table; columns in ``right`` are right-aligned (numbers)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        parts = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header)] + [line(r) for r in rows])
