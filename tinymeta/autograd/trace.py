"""``trace()``: watch the backward pass, one step per backward rule.

The engine runs the graph's nodes newest first; each *step* applies one
node's backward rule: it receives ``gy``, the gradient of the loss with
respect to each output of the node, and returns ``gx``, the gradient with
respect to each input (None for an input that needs none). A trace records,
for each step, the op, the shapes, the norm of every ``gy`` and ``gx``, the
time the rule took and the bytes the node had saved for it.

    import tinymeta as tm
    w = tm.randn(3, 2, requires_grad=True)
    loss = (tm.randn(4, 3) @ w).tanh().sum()
    with tm.autograd.trace() as tr:
        loss.backward()
    print(tr)                   # a table, one row per step
    tr.steps[0].op              # "Sum": the data is a list of BackwardStep
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tinymeta.autograd import _hooks
from tinymeta.autograd import graph as _graph
from tinymeta.backend import get_array_module, to_numpy
from tinymeta.grad_mode import is_grad_enabled


@dataclass
class BackwardStep:
    """One backward rule applied by the engine."""

    index: int  # position in the whole trace, from 0
    pass_index: int  # which backward pass (``tm.grad`` / ``.backward()`` call), from 0
    op: str  # the op's name, e.g. "MatMul"
    formula: str  # the math, from the op's docstring
    generation: int  # the node's generation (depth in the graph)
    node_id: int  # id() of the Function, to match it with a graph you still hold
    input_shapes: tuple  # shape of each input of the node
    output_shapes: tuple  # shape of each output
    grad_output_norms: tuple  # ||gy|| for each output: the gradients coming in
    grad_input_norms: tuple  # ||gx|| for each input (None: not needed): going out
    seconds: float  # wall time of the rule
    saved_bytes: int  # bytes the node saved for this rule
    create_graph: bool  # was the rule itself recorded (for a higher order)?
    # With trace(keep_grads=True), NumPy copies of the gradients themselves.
    grad_outputs: tuple | None = None
    grad_inputs: tuple | None = None


@dataclass
class BackwardPass:
    """One call of ``backward``/``grad`` seen by the trace."""

    index: int
    create_graph: bool
    retain_graph: bool
    steps: list[BackwardStep] = field(default_factory=list)
    # id -> nbytes of the arrays the pass's nodes had saved (an array two nodes share counts once)
    saved: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    @property
    def saved_bytes(self) -> int:
        """Bytes the nodes of this pass had saved, each array counted once."""
        return sum(self.saved.values())


class Trace:
    """The record of every backward step run while the ``with`` block was open.

    ``steps``   all steps in order (a list of ``BackwardStep``)
    ``passes``  the same steps grouped by backward call (``BackwardPass``)
    ``str(tr)`` or ``tr.table()`` prints them as a table.

    A trace sees the backward passes of the whole process while it is open.
    It can be entered again later to add more steps, but not while it is open.
    """

    def __init__(self, keep_grads: bool = False):
        self.keep_grads = keep_grads
        self.steps: list[BackwardStep] = []
        self.passes: list[BackwardPass] = []

    # --- the context manager --------------------------------------------------------------
    def __enter__(self) -> Trace:
        if self in _hooks.tracers:
            raise RuntimeError("this trace is already open")
        _hooks.tracers.append(self)
        _hooks.refresh()
        return self

    def __exit__(self, *exc) -> bool:
        _hooks.tracers.remove(self)
        _hooks.refresh()
        return False

    # --- called by the engine (through tinymeta.autograd._hooks) --------------------------
    def _begin_pass(self, create_graph: bool, retain_graph: bool) -> None:
        self.passes.append(BackwardPass(len(self.passes), create_graph, retain_graph))

    def _record(self, fn, gys, gxs, seconds: float) -> None:
        if not self.passes:  # a rule run outside a pass the trace saw begin
            self._begin_pass(is_grad_enabled(), True)
        gxs = gxs if isinstance(gxs, tuple) else (gxs,)
        outputs = _graph.output_tensors(fn)
        saved = _graph.saved_arrays(fn)
        step = BackwardStep(
            index=len(self.steps),
            pass_index=self.passes[-1].index,
            op=fn.op_name(),
            formula=_graph.formula(type(fn)),
            generation=fn.generation,
            node_id=id(fn),
            input_shapes=tuple(tuple(x.shape) for x in fn.inputs),
            output_shapes=tuple(
                tuple(y.shape) if y is not None else tuple(g.shape) for y, g in zip(outputs, gys)
            ),
            grad_output_norms=tuple(_norm(g) for g in gys),
            grad_input_norms=tuple(_norm(g) for g in gxs),
            seconds=seconds,
            saved_bytes=_graph.unique_nbytes(a for _, a in saved),
            create_graph=is_grad_enabled(),  # the engine runs rules in grad mode = create_graph
        )
        if self.keep_grads:
            step.grad_outputs = tuple(_copy(g) for g in gys)
            step.grad_inputs = tuple(_copy(g) for g in gxs)
        self.steps.append(step)
        self.passes[-1].steps.append(step)
        for _, array in saved:
            self.passes[-1].saved.setdefault(id(array), array.nbytes)

    # --- reading the record ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        return iter(self.steps)

    def __getitem__(self, i) -> BackwardStep:
        return self.steps[i]

    @property
    def seconds(self) -> float:
        """Total wall time of the backward rules (not of the engine's bookkeeping)."""
        return sum(s.seconds for s in self.steps)

    def count_by_op(self) -> dict[str, int]:
        """``{op: number of steps}``, most frequent first."""
        counts: dict[str, int] = {}
        for s in self.steps:
            counts[s.op] = counts.get(s.op, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def table(self) -> str:
        """The steps as a text table, one block per backward pass."""
        if not self.steps:
            return "trace: no backward step was run"
        blocks = []
        for p in self.passes:
            saved = _graph.format_bytes(p.saved_bytes)
            head = (
                f"backward pass {p.index + 1} of {len(self.passes)} "
                f"(create_graph={p.create_graph}, retain_graph={p.retain_graph}): "
                f"{len(p.steps)} step{'' if len(p.steps) == 1 else 's'}, "
                f"{_format_seconds(p.seconds)}, {saved} saved"
            )
            rows = [
                [
                    str(s.index),
                    s.op,
                    _shapes(s.input_shapes),
                    _shapes(s.output_shapes),
                    _norms(s.grad_output_norms),
                    _norms(s.grad_input_norms),
                    _format_seconds(s.seconds),
                    _graph.format_bytes(s.saved_bytes),
                ]
                for s in p.steps
            ]
            header = ["step", "op", "inputs", "outputs", "|gy|", "|gx|", "time", "saved"]
            blocks.append(head + "\n" + _graph.format_table(header, rows, right={0, 6, 7}))
        return "\n\n".join(blocks)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"<Trace: {len(self.steps)} steps in {len(self.passes)} backward passes>"


def trace(keep_grads: bool = False) -> Trace:
    """Record every backward step run inside the ``with`` block.

    ``with tm.autograd.trace() as tr: loss.backward()``; then ``print(tr)``.
    With ``keep_grads=True`` each step also keeps NumPy copies of its
    gradients (``grad_outputs``, ``grad_inputs``), for small graphs.
    """
    return Trace(keep_grads=keep_grads)


# --- helpers ------------------------------------------------------------------------------


def _norm(g) -> float | None:
    """The Euclidean norm of a gradient tensor (over all its elements)."""
    if g is None:
        return None
    a = g.data
    xp = get_array_module(a)
    return float(xp.sqrt(xp.sum(xp.abs(a.astype(xp.float64)) ** 2)))


def _copy(g):
    return None if g is None else to_numpy(g.data).copy()


def _shapes(shapes: tuple) -> str:
    return ", ".join(_graph.describe_shape(s) for s in shapes)


def _norms(norms: tuple) -> str:
    return ", ".join("-" if n is None else _format_number(n) for n in norms)


def _format_number(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _format_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"
