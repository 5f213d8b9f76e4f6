"""``detect_anomaly()``: stop at the first op that produces a NaN or an Inf.

A NaN in a loss is the end of a long story: somewhere an op produced it
(``log`` of a negative number in the forward pass, ``sqrt`` at 0 whose
derivative ``1 / (2 sqrt(x))`` is infinite in the backward pass) and every
op after it passed it on. Inside ``detect_anomaly()``:

* every op's forward output is checked; the first non-finite one raises;
* every backward rule's gradients are checked; the first non-finite one
  raises, naming the op whose rule produced it (even when the NaN came out of
  one of the smaller ops the rule is built from);
* every recorded node remembers where in *your* code it was created, so the
  error of a backward rule points at the line of the forward that made the
  node, which is usually far from the ``.backward()`` call.

    import tinymeta as tm
    x = tm.tensor([0.0, 1.0], requires_grad=True)
    with tm.autograd.detect_anomaly():
        y = x.sqrt().sum()          # the error names this line ...
        y.backward()                # ... raised from here: sqrt's gx = gy / (2 y) is inf

Remembering where each node came from walks the Python stack at every op,
which is slow: use anomaly mode to hunt a bug, not to train.
"""

from __future__ import annotations

import functools
import linecache
import os
import sys
from dataclasses import dataclass

from tinymeta.autograd import _hooks
from tinymeta.autograd import graph as _graph
from tinymeta.backend import get_array_module

# Frames in files under this folder belong to tinymeta, not to the user.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_STACK_LIMIT = 6  # user frames kept per node: enough to see the call path, cheap to keep


class AnomalyError(RuntimeError):
    """Raised by ``detect_anomaly()``; a RuntimeError with the facts as attributes.

    ``op``        name of the op to blame (``"Log"``)
    ``phase``     ``"forward"`` or ``"backward"``
    ``where``     ``(filename, line)`` in user code where that op's node was
                  created (None when it was created outside anomaly mode)
    ``function``  the node itself (None for a forward op that was not recorded)
    """

    def __init__(self, message: str, *, op: str, phase: str, where, function):
        super().__init__(message)
        self.op, self.phase, self.where, self.function = op, phase, where, function


@dataclass(frozen=True)
class Origin:
    """Where a node was created: user frames (outermost first), and, for a node
    made by a backward rule with ``create_graph=True``, which op's rule made it and
    where *that* node came from. (Names and frames only: an origin keeps no node alive.)"""

    frames: tuple  # ((filename, line, function name), ...)
    rule_op: str | None = None  # the op whose backward rule created the node
    rule_origin: Origin | None = None  # where that op's node was created


class detect_anomaly:
    """Context manager: raise ``AnomalyError`` at the first NaN/Inf an op produces.

    Checks every op's forward output and every backward rule's gradients
    inside the block; see the module docstring. Blocks may be nested. The
    engine's hooks are restored on exit, even when the block raises.
    """

    def __enter__(self) -> detect_anomaly:
        _hooks.anomaly_checks.append((check_forward, check_backward))
        _hooks.refresh()
        return self

    def __exit__(self, *exc) -> bool:
        _hooks.anomaly_checks.pop()
        _hooks.refresh()
        return False


# --- the checks (called through tinymeta.autograd._hooks) ---------------------------------


def check_forward(fn, outputs) -> None:
    """After an op's forward: remember where a recorded node came from; check its outputs."""
    if fn.inputs is not None:  # recorded: its backward may run later, remember its origin
        if _hooks.rules_running:  # made by a backward rule (create_graph=True)
            rule = _hooks.rules_running[-1]
            origin = Origin(_user_frames(), rule.op_name(), getattr(rule, "_anomaly_origin", None))
        else:
            origin = Origin(_user_frames())
        fn._anomaly_origin = origin
    for j, y in enumerate(outputs):
        counts = _nonfinite(y.data)
        if counts is None:
            continue
        what = f"output {j} (shape {_graph.describe_shape(y.shape)}) has {_counts_text(counts, y)}"
        if _hooks.rules_running:
            # The op is one step of a backward rule: blame the rule, whose node the user made.
            rule = _hooks.rules_running[-1]
            raise _backward_error(rule, f"inside the rule, {fn.op_name()} ran and its {what}")
        inputs_note = ""
        if fn.inputs is not None and any(_nonfinite(x.data) for x in fn.inputs):
            inputs_note = "\n(its inputs already held NaN/Inf: the problem starts before this op)"
        origin = getattr(fn, "_anomaly_origin", None) or Origin(_user_frames())
        message = (
            f"detect_anomaly: {fn.op_name()} produced NaN/Inf in the forward pass: its {what}.\n"
            f"  {fn.op_name()}: {_graph.formula(type(fn))}{inputs_note}\n"
            f"{fn.op_name()} was called at (most recent call last):\n"
            + _format_frames(origin.frames)
        )
        raise AnomalyError(
            message,
            op=fn.op_name(),
            phase="forward",
            where=_innermost(origin),
            function=fn if fn.inputs is not None else None,
        )


def check_backward(fn, gys, gxs) -> None:
    """After a backward rule: check the gradients it returned."""
    gxs = gxs if isinstance(gxs, tuple) else (gxs,)
    for i, gx in enumerate(gxs):
        if gx is None:
            continue
        counts = _nonfinite(gx.data)
        if counts is None:
            continue
        what = (
            f"the gradient for input {i} (shape {_graph.describe_shape(gx.shape)}) has "
            f"{_counts_text(counts, gx)}"
        )
        if any(g is not None and _nonfinite(g.data) for g in gys):
            what += " (the gradient it received already held NaN/Inf)"
        raise _backward_error(fn, what)


def _backward_error(fn, what: str) -> AnomalyError:
    origin = getattr(fn, "_anomaly_origin", None)
    message = (
        f"detect_anomaly: the backward rule of {fn.op_name()} produced NaN/Inf: {what}.\n"
        f"  {fn.op_name()}: {_graph.formula(type(fn))}\n" + _describe_origin(fn.op_name(), origin)
    )
    return AnomalyError(
        message, op=fn.op_name(), phase="backward", where=_innermost(origin), function=fn
    )


def _describe_origin(op: str, origin: Origin | None) -> str:
    """Where a node was created; for a node made by a backward rule, the chain of rules
    back to the forward-pass node the user wrote."""
    lines = []
    while True:
        if origin is None:
            lines.append(
                f"{op} was created outside detect_anomaly(), so where is unknown: "
                "run the forward pass inside the `with` block too."
            )
            break
        if origin.rule_op is None:
            lines.append(f"{op} was created at (most recent call last):")
            lines.append(_format_frames(origin.frames))
            break
        lines.append(
            f"{op} was created by the backward rule of {origin.rule_op} "
            "(a gradient computed with create_graph=True), called at:"
        )
        lines.append(_format_frames(origin.frames))
        op, origin = origin.rule_op, origin.rule_origin
    return "\n".join(lines)


# --- helpers ------------------------------------------------------------------------------


def _nonfinite(array) -> tuple[int, int] | None:
    """``(number of NaN, number of Inf)`` in a float array, or None when all are finite."""
    if array.dtype.kind not in "fc":
        return None
    xp = get_array_module(array)
    finite = xp.isfinite(array)
    if bool(finite.all()):
        return None
    nan = int(xp.isnan(array).sum())
    return nan, int(array.size - int(finite.sum()) - nan)


def _counts_text(counts: tuple[int, int], t) -> str:
    nan, inf = counts
    parts = [f"{nan} NaN"] if nan else []
    parts += [f"{inf} Inf"] if inf else []
    return f"{' and '.join(parts)} of {t.size} values"


def _user_frames() -> tuple:
    """The innermost user frames (outside tinymeta) of the current stack, outermost first."""
    frames = []
    f = sys._getframe(1)
    while f is not None and len(frames) < _STACK_LIMIT:
        filename = f.f_code.co_filename
        if _is_user_file(filename):
            frames.append((filename, f.f_lineno, f.f_code.co_name))
        f = f.f_back
    return tuple(reversed(frames))


@functools.lru_cache(maxsize=1024)
def _is_user_file(filename: str) -> bool:
    return not os.path.abspath(filename).startswith(_PACKAGE_DIR)


def _innermost(origin: Origin | None):
    if origin is None or not origin.frames:
        return None
    filename, line, _ = origin.frames[-1]
    return filename, line


def _format_frames(frames: tuple) -> str:
    if not frames:
        return "  (no frame outside tinymeta)"
    out = []
    for filename, line, name in frames:
        out.append(f'  File "{filename}", line {line}, in {name}')
        source = linecache.getline(filename, line).strip()
        if source:
            out.append(f"    {source}")
    return "\n".join(out)
