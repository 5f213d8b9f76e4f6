"""Capture and replay: a training step whose shapes do not change, run as a flat list of calls.

``step = tm.capture(step_fn)``; the first ``step(*inputs)`` runs ``step_fn`` eagerly and
records every array-level call it makes; later calls with inputs of the same shapes and
dtypes run only those calls on the new arrays: no tensors, no graph nodes, no engine.

What is recorded, and how it is found:

* every op's ``forward`` (``Function.apply`` hands it to :func:`_on_apply` through
  ``function._capture_hook``), including the ops that backward rules are built from, with
  the arrays the forward stores on the node for its backward (a mask, an arg-max);
* every NumPy call on an array that the step computed or read from a tensor. Those arrays
  are :class:`_Traced` views while the step is captured: a ufunc, a NumPy function, indexing,
  ``reshape``, ``astype``, ``copy`` ... on one is recorded wherever it happens (gradient sums
  in the engine, masks in backward rules, in-place updates). A view made any other way
  raises, so that no computed array can become a silent constant;
* calls of ``tinymeta.kernels`` made outside a forward;
* ``Optimizer.step()`` as one call, replayed by calling it again (its Python-side state, such
  as Adam's step count, changes from call to call), after the parameters' ``.grad`` are set
  to the replayed gradients.

What cannot be replayed is refused while capturing, with the op and the line of user code:
a value read back into Python (``.item()``, ``float(t)``, ``bool(t)`` and so a Python branch
on a tensor's values, ``.numpy()``, ``.tolist()``), random numbers from tinymeta's generator
(``tm.randn``, ``tm.rand``, layer initialisation), ``tm.tensor(t)`` of a captured array, a
step that reads a ``.grad`` left over from before it, or assigns a tensor's ``.data``. The
limits (documented in docs/capture.md): a ``numpy.random.Generator`` passed in by the user,
``np.asarray``/``np.array`` of a captured array (NumPy offers no hook for them) and state
kept outside tensors, their ``.grad`` and the optimizers.

On cuda (inputs on cuda), the step becomes CUDA graphs instead: tinymeta/cuda_graph.py,
which applies the same refusals (:func:`refuse_read_backs_and_draws`).

The replay keeps everything else fixed: arrays that the step only read (constants, the
parameters, which optimizers change in place) are used by reference. Calls whose results are
the same on every replay (the engine's seeds and what is computed from them alone, view ops
of the parameters) run once, at capture (:func:`_fold`), and a replay drops each array right
after the last call that reads it (:func:`_dead_after`).
"""

from __future__ import annotations

import copy
import functools
import gc
import importlib
import inspect
import os
import sys
import threading
import types
import weakref

import numpy as np

from tinymeta import function as _function
from tinymeta.tensor import Tensor, swap_array


class CaptureError(RuntimeError):
    """The step does something that a replay could not repeat faithfully."""


# The capture being recorded now (a _Recorder), or None.
_active = None


def capture(step_fn=None, *, on_change: str = "recapture"):
    """Wrap ``step_fn`` so that its first call is captured and later calls replay it.

    Usable as ``tm.capture(fn)`` or as the decorator ``@tm.capture``. Inputs may be tensors
    or arrays (arrays reach ``step_fn`` as tensors); other arguments (numbers, strings) are
    part of the signature. When a call's inputs differ in shape, dtype or device, or a
    tensor the step read has new ``.data``, the step is captured again
    (``on_change="recapture"``) or a ``CaptureError`` is raised (``on_change="raise"``).
    The replay returns what the step returned with every tensor replaced by a new tensor
    over the replayed array (no ``grad_fn``).
    """
    if on_change not in ("recapture", "raise"):
        raise ValueError(f"capture: on_change must be 'recapture' or 'raise', got {on_change!r}")
    if step_fn is None:
        return functools.partial(capture, on_change=on_change)
    return Captured(step_fn, on_change)


class Captured:
    """A captured step: ``__call__`` captures on the first call and replays afterwards."""

    def __init__(self, step_fn, on_change: str):
        self.step_fn = step_fn
        self.on_change = on_change
        self.program = None  # a _Program once captured
        self.captures = 0  # how many times the step was captured (tests and users look)
        functools.update_wrapper(self, step_fn)

    def __call__(self, *args, **kwargs):
        if kwargs:
            raise TypeError(
                f"capture: {_name(self.step_fn)} takes positional inputs only when captured, "
                f"got keyword arguments {sorted(kwargs)}"
            )
        key = _signature(args)
        python_state = (_modes(), _python_state(self.step_fn))
        program = self.program
        if (
            program is not None
            and program.key == key
            and program.python_state == python_state
            and program.state_unchanged()
        ):
            return program.replay(args)
        if program is not None and self.on_change == "raise":
            raise CaptureError(
                f"capture: {_name(self.step_fn)} was captured for inputs {program.key} but is "
                f"called with {key} (or a tensor it read has new .data, or a Python value it "
                "reads changed: a closure variable, a global, a module's training flag); pass "
                "on_change='recapture' to capture it again"
            )
        self.program = None
        if _cuda_path is not None and _cuda_path.on_cuda(args):  # CUDA graphs
            result, self.program = _cuda_path.warm_up(self.step_fn, args, key)
        else:
            result, self.program = _record(self.step_fn, args, key)
        self.program.python_state = python_state
        self.captures += 1
        return result

    def reset(self) -> None:
        """Forget the captured program: the next call captures again."""
        self.program = None


# The CUDA-graph path, tinymeta/cuda_graph.py, which builds on this module: it registers itself
# here (the package imports it), so that the dependency runs one way.
_cuda_path = None


def register_cuda_path(module) -> None:
    """Hand steps whose inputs are on cuda to ``module`` (``on_cuda(args)``,
    ``warm_up(step_fn, args, key)``)."""
    global _cuda_path
    _cuda_path = module


def _name(fn) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def _signature(args) -> tuple:
    """What a replay must match: each input's kind, shape, dtype and device, other values."""
    key = []
    for a in args:
        if isinstance(a, Tensor):
            key.append(("tensor", a.shape, a.dtype.str, type(a.data), a.requires_grad))
        elif isinstance(a, np.ndarray):
            key.append(("array", a.shape, a.dtype.str, type(a)))
        elif type(a).__module__.startswith("cupy"):
            key.append(("array", a.shape, a.dtype.str, type(a)))
        elif hasattr(a, "__cuda_array_interface__"):
            raise CaptureError(
                f"capture: a {type(a).__name__} input; device inputs are CuPy arrays or tensors"
            )
        else:
            key.append(("value", type(a), a))
    return tuple(key)


# --- the traced array -------------------------------------------------------------------------


class _Traced(np.ndarray):
    """A view of an array the captured step computed or read: NumPy calls on it are recorded.

    Outside a capture, or inside an op's forward (recorded as a whole), it computes as a
    plain array and returns plain arrays.
    """

    def __array_finalize__(self, obj):
        rec = _recording()
        if rec is not None and not rec.making:
            raise CaptureError(
                "capture: an array operation that the capture does not record "
                f"(a view or copy made outside NumPy's ufuncs and functions) {_where()}"
            )

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        call = getattr(ufunc, method)
        return _call(call, f"numpy.{ufunc.__name__}.{method}", inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return _call(func, f"numpy.{func.__name__}", args, kwargs)

    # Read back into Python: the value would be frozen into the replay.
    def item(self, *args):
        return _read_back(self, "item", args)

    def tolist(self):
        return _read_back(self, "tolist", ())

    def tobytes(self, *args, **kwargs):
        return _read_back(self, "tobytes", args)

    def __float__(self):
        return _read_back(self, "__float__", ())

    def __int__(self):
        return _read_back(self, "__int__", ())

    def __index__(self):
        return _read_back(self, "__index__", ())

    def __bool__(self):
        return _read_back(self, "__bool__", ())

    def __complex__(self):
        return _read_back(self, "__complex__", ())

    @property
    def T(self):
        return _call(np.ndarray.transpose, "ndarray.T", (self,), {})


def _method(name):
    base = getattr(np.ndarray, name)

    def method(self, *args, **kwargs):
        return _call(base, f"ndarray.{name}", (self, *args), kwargs)

    method.__name__ = name
    return method


# ndarray methods that C code runs without NumPy's override protocols; the reductions
# (sum, mean, max, ...) and operators go through ufuncs and need nothing here.
for _m in (
    "__getitem__", "__setitem__", "reshape", "transpose", "ravel", "flatten", "squeeze",
    "swapaxes", "astype", "copy", "view", "fill", "repeat", "take", "put", "argmax", "argmin",
    "dot", "cumsum", "cumprod", "nonzero", "diagonal", "sort", "argsort", "round", "conj",
    "clip", "__copy__", "__deepcopy__", "__iter__",
):  # fmt: skip
    setattr(_Traced, _m, _method(_m))


def _recording():
    """The active recorder when this thread's array calls are the step's to record now."""
    rec = _active
    if rec is None or rec.depth or threading.get_ident() != rec.thread:
        return None
    return rec


def _read_back(array, what: str, args):
    if _recording() is None:
        return getattr(np.ndarray, what)(_plain(array), *args)
    raise CaptureError(
        f"capture: {what}() reads a computed value back into Python {_where()}; a replay "
        "would repeat the value of the capturing call (a Python branch on a tensor's value, "
        "float(t), t.item() and t.numpy() cannot be captured): compute it with tensor ops, "
        "or leave it out of the captured step"
    )


def _plain(a):
    return np.ndarray.view(a, np.ndarray)


def _unwrap(x):
    """``x`` with every traced array replaced by a plain view (in lists, tuples, dicts)."""
    if isinstance(x, _Traced):
        return _plain(x)
    if type(x) in (list, tuple):
        return type(x)(_unwrap(v) for v in x)
    if type(x) is dict:
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _call(call, name: str, args, kwargs):
    """Run ``call`` on plain arrays; while a capture records, record it."""
    result = call(*_unwrap(args), **_unwrap(kwargs))
    rec = _recording()
    if rec is None:
        return result
    return rec.record(call, name, args, kwargs, result)


# --- recording --------------------------------------------------------------------------------


class _Ref:
    """A placeholder in a recorded call's arguments: slot ``i`` of the replay's values."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i

    def __repr__(self):
        return f"%{self.i}"


class _Recorder:
    def __init__(self):
        self.depth = 0  # > 0 inside an op's forward or an optimizer step: not recorded
        self.thread = threading.get_ident()  # ops of other threads are not the step's
        self.making = False  # True while the recorder itself makes a traced view
        self.objects = []  # slot -> the traced array of the capturing call (kept alive)
        self.slot_of = {}  # id(traced array) -> slot
        self.fixed = {}  # slot -> the array a replay reads by reference (a parameter's)
        self.forbidden = {}  # slot -> why a replay may not read it
        self.calls = []  # the program: (kind, ...) tuples, see _Program
        self.swapped = []  # (tensor, its own array, the traced view it holds while capturing)
        self.swapped_ids = set()
        self.module_state = {}  # id(module) -> (module, its plain attributes) at the start
        self.called_modules = set()  # id of every module called by the step
        self.final_grads = {}  # id(tensor) -> slot of its .grad after the step, or None
        self.grad_before = {}  # id(tensor) -> its .grad when it was swapped in
        self.grad_tensor_slot = {}  # id(a .grad tensor handed to an optimizer) -> its slot

    # slots
    def new_slot(self, array) -> int:
        """A slot for ``array`` (a plain array or NumPy scalar); returns its slot."""
        self.making = True
        try:
            traced = np.asarray(array).view(_Traced)
        finally:
            self.making = False
        slot = len(self.objects)
        self.objects.append(traced)
        self.slot_of[id(traced)] = slot
        return slot

    def traced(self, slot: int):
        return self.objects[slot]

    def template(self, x):
        """``x`` with traced arrays replaced by _Ref placeholders (in lists, tuples, dicts)."""
        if isinstance(x, _Traced):
            slot = self.slot_of.get(id(x))
            if slot is None:
                raise CaptureError(
                    f"capture: an array of unknown origin reached a recorded call {_where()}"
                )
            if slot in self.forbidden:
                raise CaptureError(f"capture: {self.forbidden[slot]} {_where()}")
            return _Ref(slot)
        if type(x) in (list, tuple):
            return type(x)(self.template(v) for v in x)
        if type(x) is dict:
            return {k: self.template(v) for k, v in x.items()}
        return x

    def outputs(self, result):
        """Slots for a call's result; returns (the traced result, the slots)."""
        if isinstance(result, (np.ndarray, np.generic)):
            slot = self.new_slot(result)
            return self.objects[slot], slot
        if type(result) in (tuple, list) and all(isinstance(r, np.ndarray) for r in result):
            slots = tuple(self.new_slot(r) for r in result)
            return type(result)(self.objects[s] for s in slots), slots
        if result is None:
            return None, None
        return result, None

    def record(self, call, name: str, args, kwargs, result):
        """Record a NumPy call made on traced arrays; returns its result as traced arrays."""
        if name in _STRUCTURAL:  # shapes and memory only: nothing to replay
            return result
        args_t, kwargs_t = self.template(args), self.template(kwargs)
        out = kwargs.get("out")
        if out is not None:  # in place: the result is the out= array(s) the caller passed
            for o in out if type(out) is tuple else (out,):
                if isinstance(o, np.ndarray) and not isinstance(o, _Traced):
                    # (mask &= x > 0 on a fresh np.ones): a replay would start from the
                    # capturing call's result instead of the array's state before the call.
                    raise CaptureError(
                        f"capture: {name} writes a computed value into an array that the "
                        f"capture does not follow (shape {o.shape}) {_where()}: a replay "
                        "would start from the capturing call's result; compute it out of place"
                    )
            self.calls.append(("call", call, name, args_t, kwargs_t, None))
            return out[0] if type(out) is tuple and len(out) == 1 else out
        if name in ("ndarray.__setitem__", "ndarray.fill", "ndarray.put", "ndarray.sort"):
            self.calls.append(("call", call, name, args_t, kwargs_t, None))
            return result
        if result is not None and not _all_arrays(result):
            raise CaptureError(
                f"capture: {name} returns a Python {type(result).__name__} computed from "
                f"captured arrays {_where()}; a replay would repeat the capturing call's value"
            )
        traced, slots = self.outputs(result)
        self.calls.append(("call", call, name, args_t, kwargs_t, slots))
        return traced

    # tensors the step reads: parameters, inputs, constants
    def swap_in(self, t: Tensor) -> None:
        """Let ``t`` hold a traced view of its array while capturing (a replay reads its own
        array by reference); once per tensor. A ``.grad`` it already has may not be read."""
        if id(t) in self.swapped_ids or isinstance(t.data, _Traced):
            return
        own = t.data
        if type(own) is not np.ndarray:
            raise CaptureError(
                f"capture: a tensor of type {type(own).__name__} (shape {t.shape}) is read "
                f"{_where()} by a step whose inputs are on cpu; a step on cuda is captured "
                "as CUDA graphs when its inputs are on cuda: pass them in"
            )
        slot = self.new_slot(own)
        self.fixed[slot] = own
        self.swapped.append((t, own, self.objects[slot]))
        self.swapped_ids.add(id(t))
        self.grad_before[id(t)] = t.grad
        swap_array(t, self.objects[slot])
        g = t.grad
        if g is not None and type(g.data) is np.ndarray:
            self.swap_in(g)
        if g is not None and self.slot_of.get(id(g.data)) in self.fixed:  # not computed here
            self.forbidden[self.slot_of[id(g.data)]] = (
                f"the step reads the .grad (shape {t.shape}) that a tensor had before the "
                "step started; a replay would read that same stale .grad: call "
                "opt.zero_grad() in the step, before the backward"
            )

    def restore(self) -> None:
        """Give every swapped tensor its own array back; note where each .grad ended."""
        assigned = None
        for t, own, traced in reversed(self.swapped):
            if t.data is traced:
                swap_array(t, own)
            else:  # the step assigned .data: keep what it assigned, as a plain array
                swap_array(t, _plain(t.data) if isinstance(t.data, _Traced) else t.data)
                assigned = t
        if assigned is not None:
            raise CaptureError(
                f"capture: the step assigned .data of a tensor of shape {assigned.shape}; a "
                "replay cannot repeat that: change it in place (copy_, add_) instead"
            )
        for t, _, _ in self.swapped:
            g = t.grad
            if g is None:
                self.final_grads[id(t)] = None
            elif isinstance(g.data, _Traced):
                self.final_grads[id(t)] = self.template(g.data).i
                swap_array(g, _plain(g.data))
            elif id(g) in self.grad_tensor_slot:  # handed to an optimizer step
                self.final_grads[id(t)] = self.grad_tensor_slot[id(g)]


def _all_arrays(result) -> bool:
    if isinstance(result, (np.ndarray, np.generic)):
        return True
    return type(result) in (tuple, list) and all(isinstance(r, np.ndarray) for r in result)


# NumPy functions whose Python results depend on shapes and memory only, not on values.
_STRUCTURAL = {
    "numpy.shape", "numpy.ndim", "numpy.size", "numpy.result_type", "numpy.shares_memory",
    "numpy.may_share_memory", "numpy.iscomplexobj", "numpy.isrealobj", "numpy.can_cast",
}  # fmt: skip


def _on_apply(fn, tensors, arrays):
    """``function._capture_hook``: run ``fn``'s forward and record it as one call."""
    rec = _active
    if rec.depth or threading.get_ident() != rec.thread:  # inside a forward, another thread
        return fn.forward(*[_plain(a) if isinstance(a, _Traced) else a for a in arrays])
    for t in tensors:
        if not isinstance(t.data, _Traced):
            rec.swap_in(t)
    traced_in = [t.data for t in tensors]
    refs = rec.template(traced_in)
    before = dict(fn.__dict__)
    # Arrays among the op's parameters (an index array, say) are replay inputs too.
    params = {k: rec.template(v) for k, v in before.items() if _holds_traced(v)}
    rec.depth += 1
    try:
        ys = fn.forward(*[_plain(a) for a in traced_in])
    finally:
        rec.depth -= 1
    single = type(ys) is not tuple
    traced_out, slots = rec.outputs(ys if single else tuple(ys))
    # Arrays the forward kept on the node for its backward (masks, arg-max): their traced
    # views replace them, and a replay reads them back after the forward.
    kept = []
    for k, v in list(fn.__dict__.items()):
        if before.get(k) is v:
            continue
        if isinstance(v, (np.ndarray, np.generic)):
            slot = rec.new_slot(v)
            setattr(fn, k, rec.objects[slot])
            kept.append((k, slot))
        elif type(v) in (tuple, list) and any(isinstance(x, np.ndarray) for x in v):
            if not all(isinstance(x, (np.ndarray, np.generic)) for x in v):
                raise CaptureError(
                    f"capture: {fn.op_name()}.forward keeps {k!r} mixing arrays and other "
                    f"values {_where()}; the capture cannot follow it"
                )
            slots = [rec.new_slot(x) for x in v]
            setattr(fn, k, type(v)(rec.objects[i] for i in slots))
            kept.append((k, tuple(slots)))
        elif isinstance(v, float):
            raise CaptureError(
                f"capture: {fn.op_name()}.forward keeps a Python number {k!r} for its "
                f"backward {_where()}; it may depend on the values, which a replay would "
                "repeat: keep a 0-d array instead"
            )
        elif _contains_array(v):
            raise CaptureError(
                f"capture: {fn.op_name()}.forward keeps arrays in {k!r} inside a "
                f"{type(v).__name__} {_where()}; the capture follows arrays kept alone or in a "
                "flat tuple or list"
            )
    replica = copy.copy(fn)  # the node is not recorded yet: no inputs, no outputs
    rec.calls.append(("forward", replica, fn.op_name(), refs, params, slots, single, kept))
    return traced_out


def _contains_array(v) -> bool:
    if isinstance(v, np.ndarray):
        return True
    if type(v) in (tuple, list):
        return any(_contains_array(x) for x in v)
    if type(v) is dict:
        return any(_contains_array(x) for x in v.values())
    return False


def _holds_traced(v) -> bool:
    if isinstance(v, _Traced):
        return True
    return type(v) in (tuple, list) and any(isinstance(x, _Traced) for x in v)


def _where() -> str:
    """'in <op or function> (file:line), from <user file>:<line>' for the current stack."""
    frame = sys._getframe(1)
    here = os.path.dirname(os.path.abspath(__file__))
    numpy_dir = os.path.dirname(np.__file__)
    inner = None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path == os.path.abspath(__file__) or path.startswith(numpy_dir):
            frame = frame.f_back
            continue
        if path.startswith(here) or "/kernels/" in path:
            if inner is None:
                owner = frame.f_locals.get("self")
                name = frame.f_code.co_name
                if owner is not None and not isinstance(owner, np.ndarray):
                    name = f"{type(owner).__name__}.{name}"
                inner = f"{name} ({os.path.relpath(path, os.path.dirname(here))}:{frame.f_lineno})"
            frame = frame.f_back
            continue
        user = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        return f"in {inner}, called from {user}" if inner else f"at {user}"
    return f"in {inner}" if inner else "(no user frame)"


# --- what capturing changes while it runs ------------------------------------------------------


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise CaptureError(
            f"capture: {what} {_where()}; a replay would repeat the capturing call's numbers: "
            "draw them outside the step and pass them in as inputs"
        )

    return refuse


class _RefusingRng:
    """Stands in for tinymeta's default generator while capturing: any use is refused."""

    def __getattr__(self, name):
        return _refuse(f"the default random generator's {name}() is used")


def _tensor_read_back(what: str):
    def read_back(self, *args, **kwargs):
        rec = _active
        if rec is None or rec.depth:
            return _ORIGINAL_TENSOR[what](self, *args, **kwargs)
        raise CaptureError(
            f"capture: Tensor.{what}() reads a tensor's value into Python (a host transfer) "
            f"{_where()}; a replay would repeat the capturing call's value"
        )

    return read_back


_ORIGINAL_TENSOR = {}


def _copying_tensor(original):
    def tensor(data, *args, **kwargs):
        inner = data.data if isinstance(data, Tensor) else data
        if isinstance(inner, _Traced) and not _active.depth:
            raise CaptureError(
                f"capture: tm.tensor() copies a captured array through NumPy, which a replay "
                f"cannot follow {_where()}; use the tensor itself (or t * 1.0 for a copy)"
            )
        return original(data, *args, **kwargs)

    return tensor


def _optimizer_step(original):
    def step(self, closure=None):
        rec = _active
        if rec.depth:
            return original(self, closure)
        if closure is not None:
            raise CaptureError(f"capture: {type(self).__name__}.step(closure) {_where()}")
        bindings = []
        lent = []  # (a .grad tensor, its traced array): given back after the step
        # The step runs on the parameters' own arrays (updated in place) and plain gradients.
        for t, own, _ in rec.swapped:
            swap_array(t, own)
        try:
            for group in self.param_groups:
                for p in group["params"]:
                    g = p.grad
                    if g is None:
                        bindings.append((p, None))
                    elif isinstance(g.data, _Traced):
                        slot = rec.template(g.data).i
                        bindings.append((p, slot))
                        rec.grad_tensor_slot[id(g)] = slot
                        lent.append((g, g.data))
                        swap_array(g, _plain(g.data))
                    elif id(g) in rec.grad_tensor_slot:
                        bindings.append((p, rec.grad_tensor_slot[id(g)]))
                    else:
                        raise CaptureError(
                            f"capture: {type(self).__name__}.step() updates a parameter (shape "
                            f"{p.shape}) with a .grad that the step did not compute {_where()}"
                        )
            rec.depth += 1
            try:
                original(self)
            finally:
                rec.depth -= 1
        finally:
            for t, _, traced in rec.swapped:
                swap_array(t, traced)
            # A .grad read after the step (returned, logged) is the replayed gradient: with its
            # plain array it would be read as a constant, the capturing call's gradient.
            for g, traced in lent:
                swap_array(g, traced)
        rec.calls.append(("step", self, type(self).__name__, bindings))

    return step


def _bump(original):
    """Tensor._bump: an in-place change made by the step (not by an optimizer's step, which
    is replayed whole) bumps the version counter again on every replay."""

    def bump(self):
        rec = _active
        if rec is not None and not rec.depth and threading.get_ident() == rec.thread:
            rec.calls.append(("bump", weakref.ref(self), "version bump", None))
        return original(self)

    return bump


def _optimized(opt) -> tuple:
    """The ids of the parameters ``opt.step()`` updates, in order."""
    return tuple(id(p) for group in opt.param_groups for p in group["params"])


def _module_call(original):
    def call(self, *args, **kwargs):
        rec = _active
        if rec is not None and not rec.depth and threading.get_ident() == rec.thread:
            rec.called_modules.add(id(self))
        return original(self, *args, **kwargs)

    return call


# numpy.random's functions over its global generator (refused while capturing).
_NUMPY_RANDOM = (
    "rand", "randn", "random", "random_sample", "ranf", "sample", "standard_normal", "normal",
    "uniform", "randint", "random_integers", "choice", "permutation", "shuffle", "binomial",
    "poisson", "exponential", "beta", "gamma", "bytes", "laplace", "logistic", "multinomial",
    "multivariate_normal", "dirichlet", "geometric", "lognormal", "standard_t", "triangular",
)  # fmt: skip


# --- Python values a replay would freeze ------------------------------------------------------

_SKIP = object()
_PLAIN = (bool, int, float, complex, str, bytes, type(None), np.generic)
_NOT_STATE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, Tensor)


class _Same:
    """Equal to another _Same of the same object: a tensor's identity in a snapshot (a
    parameter replaced by a new tensor is read by no replay). Holds the object, so that
    its id cannot be reused while the snapshot lives."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return type(other) is _Same and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def _frozen(v, depth: int = 0):
    """A comparable copy of ``v`` when it is a plain value (a number, a string, a tensor's
    identity, a list, tuple or dict of them), else _SKIP."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, Tensor):
        return _Same(v)
    if depth < 2 and type(v) in (list, tuple, dict):
        out = []
        for k, x in v.items() if type(v) is dict else enumerate(v):
            f = _frozen(x, depth + 1)
            if f is _SKIP:
                return _SKIP
            out.append((k, f))
        return (type(v), tuple(out))
    return _SKIP


def _attributes(obj) -> tuple:
    """The plain values among ``obj``'s attributes (a module's training flag, a rule's lr)."""
    d = getattr(obj, "__dict__", None)
    if type(d) is not dict:
        return ()
    out = []
    for k, v in d.items():
        f = _frozen(v)
        if f is not _SKIP:
            out.append((k, f))
    return tuple(out)


def _modes() -> tuple:
    """Grad mode and first_order_inner_grads(): they decide what the step records."""
    from tinymeta.autograd.first_order import is_first_order
    from tinymeta.grad_mode import is_grad_enabled

    return is_grad_enabled(), is_first_order()


def _python_state(step_fn) -> tuple:
    """The Python values the step's own code reads besides its inputs: the plain values in
    its closure and among the globals it names, and the plain attributes of the objects
    there (a rule's lr, an argparse namespace, a module's training flag). A replay would
    repeat the capturing call's values (a learning rate, a counter, a first_order flag), so
    a change re-captures. Values read only by functions it calls are not seen
    (docs/capture.md)."""
    fn = getattr(step_fn, "__func__", step_fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return ()
    values = []
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            values.append((name, cell.cell_contents))
        except ValueError:  # a cell not filled yet
            pass
    values += [(f"default {i}", v) for i, v in enumerate(fn.__defaults__ or ())]
    g = fn.__globals__
    values += [(name, g[name]) for name in code.co_names if name in g]
    owner = getattr(step_fn, "__self__", None)
    if owner is not None:
        values.append(("self", owner))
    from tinymeta.optim.optimizer import Optimizer  # its step() is replayed whole

    state = []
    for name, v in values:
        f = _frozen(v)
        if f is not _SKIP:
            state.append((name, f))
        elif not isinstance(v, (*_NOT_STATE, Optimizer, Captured)):
            # A captured step's own counters (its name may be a global the body reads,
            # as `step` in `opt.step()`) change with every call: not the step's state.
            state.append((name, _attributes(v)))
    return tuple(state)


def _kernel(name, original):
    def kernel(*args, **kwargs):
        rec = _active
        if rec is None or rec.depth:
            return original(*args, **kwargs)
        args = [a.data if isinstance(a, Tensor) else a for a in args]
        return _call(original, f"{original.__module__}.{name}", args, kwargs)

    return kernel


# Public functions of tinymeta.kernels that take no arrays (the backend choice, tile counts).
_NOT_KERNELS = frozenset({"backend", "set_backend", "winograd_tiles"})


def kernel_names(kernels) -> list:
    """Every public function of tinymeta.kernels that computes on arrays (arrays in, arrays
    out; ``..._`` in place). All of them are followed while capturing: a compiled kernel
    hands back a plain array, so one left out would turn a computed value into a constant
    of the replay without a word."""
    return [
        name
        for name, fn in vars(kernels).items()
        if inspect.isfunction(fn)
        and fn.__module__ == kernels.__name__
        and not name.startswith("_")
        and name not in _NOT_KERNELS
    ]


def _same(index):
    return index


def _host_value(array, value):
    """tensor._on_device_of for a host array (traced or not): a write takes the value as is."""
    if isinstance(value, Tensor):
        value = value.data
    return value


# Functions that read values back only to check them (label ranges, say): recorded and
# replayed whole, so that a replay checks the new values too.
_CHECKED = {
    "tinymeta.nn.functional": ("_labels",),
}


def refuse_read_backs_and_draws(patch) -> None:
    """Install, with ``patch(obj, name, value)``, the refusals that the CPU capture and the
    CUDA graphs (tinymeta/cuda_graph.py) share: a tensor's value read into Python, and random
    draws from tinymeta's and NumPy's global generators (a replay would repeat the numbers)."""
    import tinymeta
    from tinymeta import creation

    for what in ("item", "numpy", "tolist", "__array__", "__float__", "__int__", "__bool__"):
        if what in Tensor.__dict__:
            _ORIGINAL_TENSOR[what] = Tensor.__dict__[what]
            patch(Tensor, what, _tensor_read_back(what))
    for module in (tinymeta, creation):
        for name in ("randn", "rand"):
            if hasattr(module, name):
                patch(module, name, _refuse(f"tm.{name}() draws random numbers"))
    patch(creation, "_global_rng", _RefusingRng())
    for name in _NUMPY_RANDOM:
        if hasattr(np.random, name):
            patch(np.random, name, _refuse(f"numpy.random.{name}() draws random numbers"))


class PatchSet:
    """Attributes swapped in for the time of one captured call, and put back in reverse."""

    def __init__(self):
        self.saved = []

    def patch(self, obj, name, value) -> None:
        # A class's own attribute (not one it inherits), so that putting it back is exact.
        self.saved.append(
            (obj, name, obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name))
        )
        setattr(obj, name, value)

    def restore(self) -> None:
        for obj, name, value in reversed(self.saved):
            setattr(obj, name, value)
        self.saved = []


class _Patches(PatchSet):
    """Everything capturing swaps in for the time of one captured call, and back."""

    def __enter__(self):
        import tinymeta
        from tinymeta import creation, kernels
        from tinymeta.optim.optimizer import Optimizer

        patch = self.patch
        refuse_read_backs_and_draws(patch)
        for module in (tinymeta, creation):
            if hasattr(module, "tensor"):
                patch(module, "tensor", _copying_tensor(creation.__dict__["tensor"]))
        patch(Optimizer, "step", _optimizer_step(Optimizer.__dict__["step"]))
        patch(Tensor, "_bump", _bump(Tensor.__dict__["_bump"]))
        from tinymeta.nn.module import Module

        patch(Module, "__call__", _module_call(Module.__dict__["__call__"]))
        for name in kernel_names(kernels):
            patch(kernels, name, _kernel(name, getattr(kernels, name)))
        # These read "not exactly a NumPy array" as "a CuPy array"; a capture runs on the CPU.
        from tinymeta.ops import inplace, shape

        patch(shape, "_index_on_device", _same)
        for module in (sys.modules["tinymeta.tensor"], shape, inplace):
            patch(module, "_on_device_of", _host_value)
        for module_name, names in _CHECKED.items():
            module = importlib.import_module(module_name)
            for name in names:
                patch(module, name, _kernel(name, getattr(module, name)))
        _function._capture_hook = _on_apply
        return self

    def __exit__(self, *exc):
        _function._capture_hook = None
        self.restore()
        return False


# --- capture and replay ---------------------------------------------------------------------


def _record(step_fn, args, key):
    """Run ``step_fn(*args)`` eagerly while recording; returns (its result, the program)."""
    global _active
    if _active is not None:
        raise CaptureError("capture: a captured step called inside another captured step")
    rec = _Recorder()
    inputs = []  # (position, slot)
    call_args = []
    _active = rec
    try:
        with _Patches():
            for i, a in enumerate(args):
                if isinstance(a, Tensor):
                    rec.swap_in(a)
                    slot = rec.slot_of[id(a.data)]
                    rec.fixed.pop(slot, None)
                    inputs.append((i, slot))
                    call_args.append(a)
                elif isinstance(a, np.ndarray):
                    slot = rec.new_slot(a)
                    inputs.append((i, slot))
                    call_args.append(Tensor._wrap(rec.objects[slot]))
                else:
                    call_args.append(a)
            # Every tensor that exists is read through a traced view while capturing, so that
            # reads of a parameter's or a buffer's array outside ops are recorded too (batch
            # norm's running statistics, say); a replay keeps those it used.
            from tinymeta.nn.module import Module

            # (By type(obj): isinstance also asks obj.__class__, which some objects of other
            # libraries compute, with a deprecation warning, e.g. torch.distributed.reduce_op.)
            for obj in gc.get_objects():
                kind = type(obj)
                if issubclass(kind, Tensor) and type(obj.data) is np.ndarray:
                    rec.swap_in(obj)
                elif issubclass(kind, Module):  # training, momentum, ...: checked at replay
                    rec.module_state[id(obj)] = (obj, _attributes(obj))
            try:
                result = step_fn(*call_args)
                outputs = _output_template(result, rec)
            finally:
                rec.restore()
    finally:
        _active = None
    program = _Program(rec, key, args, inputs, outputs)
    return program.build_result(result, rec), program


def _output_template(result, rec):
    if isinstance(result, Tensor):
        if not isinstance(result.data, _Traced):
            rec.swap_in(result)
        return ("tensor", rec.template(result.data).i)
    if type(result) in (tuple, list):
        return (type(result), [_output_template(r, rec) for r in result])
    if type(result) is dict:
        return (dict, {k: _output_template(v, rec) for k, v in result.items()})
    if isinstance(result, np.ndarray):
        raise CaptureError("capture: the step returns a NumPy array; return tensors")
    return ("value", result)


class _Program:
    """The recorded calls, ready to replay."""

    def __init__(self, rec: _Recorder, key, args, inputs, outputs):
        self.key = key
        self.inputs = inputs
        self.outputs = outputs
        self.size = len(rec.objects)
        used = _slots_used(rec.calls, outputs) | {
            s for s in rec.final_grads.values() if s is not None
        }
        self.fixed = {slot: a for slot, a in rec.fixed.items() if slot in used}
        input_ids = {id(args[i]) for i, _ in inputs}
        # Tensors whose array the replay reads by reference: it must still be theirs.
        self.watched = [
            (weakref.ref(t), own)
            for t, own, traced in rec.swapped
            if id(t) not in input_ids and rec.slot_of[id(traced)] in used
        ]
        # Where each .grad ended (a slot, or None where the step set it to None); the inputs'
        # by position.
        self.grads = [
            (weakref.ref(t), rec.final_grads[id(t)])
            for t, _, _ in rec.swapped
            if id(t) in rec.final_grads
            and id(t) not in input_ids
            and (rec.final_grads[id(t)] is not None or rec.grad_before.get(id(t)) is not None)
        ]
        self.input_grads = [
            (i, rec.final_grads[id(args[i])]) for i, _ in inputs if id(args[i]) in rec.final_grads
        ]
        outside = _slots_used([], outputs)
        outside.update(slot for _, slot in self.grads if slot is not None)
        outside.update(slot for _, slot in self.input_grads if slot is not None)
        constants, calls = _fold(rec, self.fixed, outside)
        self.fixed.update(constants)  # the arrays every replay starts from
        kept = outside | set(self.fixed)
        self.calls = [_compile(c, dead) for c, dead in zip(calls, _dead_after(calls, kept))]
        self.names = [c[2] for c in calls]
        # Modules the step called, with their plain attributes (training, momentum) as they
        # were when the capture started: a replay would repeat the behaviour they chose.
        self.modules = [
            (weakref.ref(m), attributes)
            for i, (m, attributes) in rec.module_state.items()
            if i in rec.called_modules
        ]
        self.python_state = ()  # set by Captured: see _python_state
        # Each optimizer stepped, with the parameters it updated: a replay sets the .grad of
        # those only, so a parameter added since (add_param_group) would step on a stale one.
        self.optimizers = [
            (weakref.ref(c[1]), tuple(id(p) for p, _ in c[3])) for c in rec.calls if c[0] == "step"
        ]

    def state_unchanged(self) -> bool:
        return state_unchanged(self.watched, self.modules, self.optimizers)

    def replay(self, args):
        values = [None] * self.size
        for slot, array in self.fixed.items():
            values[slot] = array
        for i, slot in self.inputs:
            a = args[i]
            values[slot] = a.data if isinstance(a, Tensor) else a
        for run in self.calls:
            run(values)
        for ref, slot in self.grads:
            t = ref()
            if t is not None:
                t.grad = None if slot is None else Tensor._wrap(values[slot])
        for i, slot in self.input_grads:
            if isinstance(args[i], Tensor):
                args[i].grad = None if slot is None else Tensor._wrap(values[slot])
        return _build(self.outputs, values)

    def build_result(self, result, rec):
        values = [_plain(o) for o in rec.objects]
        return _build(self.outputs, values)

    def __len__(self):
        return len(self.calls)


def state_unchanged(watched, modules, optimizers) -> bool:
    """Whether what a replay reads by reference is as it was at capture: each watched tensor
    (a weakref) still holds its array, each module its plain attributes, each optimizer its
    parameters (the CPU replay and the CUDA graphs both ask before replaying)."""
    for ref, own in watched:
        t = ref()
        if t is not None and t._data is not own:
            return False
    for ref, attributes in modules:
        m = ref()
        if m is not None and _attributes(m) != attributes:
            return False
    for ref, params in optimizers:
        opt = ref()
        if opt is not None and _optimized(opt) != params:
            return False
    return True


def _slots_used(calls, outputs) -> set:
    """Every slot that a recorded call or the outputs refer to."""
    used = set()
    for call in calls:
        used |= _reads(call)

    def visit_output(template):
        kind, body = template
        if kind == "tensor":
            used.add(body)
        elif kind is dict:
            for t in body.values():
                visit_output(t)
        elif kind != "value":
            for t in body:
                visit_output(t)

    visit_output(outputs)
    return used


def _refs(template, into: set) -> set:
    """Add the slots of the _Ref placeholders in ``template`` to ``into``; returns it."""
    if isinstance(template, _Ref):
        into.add(template.i)
    elif type(template) in (list, tuple):
        for t in template:
            _refs(t, into)
    elif type(template) is dict:
        for t in template.values():
            _refs(t, into)
    return into


def _reads(call) -> set:
    """The slots whose arrays a recorded call reads (its compiled form reads exactly these)."""
    kind = call[0]
    if kind in ("call", "forward"):
        return _refs(call[4], _refs(call[3], set()))
    if kind == "step":
        return {slot for _, slot in call[3] if slot is not None}
    return set()


def _writes(call) -> set:
    """The slots a recorded call puts its results (and a forward its kept arrays) in."""
    kind = call[0]
    slots = call[5] if kind in ("call", "forward") else None
    written = {slots} if type(slots) is int else set(slots or ())
    if kind == "forward":
        for _, slot in call[7]:
            written.update((slot,) if type(slot) is int else slot)
    return written


# Calls whose result's values depend on their first argument's shape and dtype only.
_FROM_SHAPE = {"numpy.ones_like", "numpy.zeros_like", "numpy.full_like"}
# NumPy calls that may return a view of their argument, its layout fixed by the shapes.
_VIEW_CALLS = {
    "numpy.broadcast_to", "numpy.reshape", "ndarray.reshape", "ndarray.transpose", "ndarray.T",
    "numpy.transpose", "numpy.swapaxes", "ndarray.swapaxes", "ndarray.squeeze",
    "numpy.squeeze", "numpy.expand_dims", "ndarray.__getitem__",
}  # fmt: skip
# Calls that write into an argument.
_IN_PLACE = {"ndarray.__setitem__", "ndarray.fill", "ndarray.put", "ndarray.sort"}


def _fold(rec, fixed: dict, outside: set) -> tuple:
    """Calls whose results are the same on every replay, run once at capture instead:
    ``(constants, the other calls)``, constants being slot -> array.

    Two kinds. Values: an engine's seed (``ones_like`` of the loss) and whatever is computed
    from such values alone (the seed scaled by a mean's 1/n, reshaped, broadcast); they are
    handed out read-only, so that a write into one raises instead of changing the next
    replay. Views: a view op (``BroadcastTo``, a reshape) of arrays that every replay reads
    by reference (the parameters, which optimizers change in place): the view sees their
    new values. Never folded: a result that outlives a replay or shares memory with one (an
    output, a .grad), an array that some call writes into, a forward that keeps a random
    generator."""
    owner = [_root(o) for o in rec.objects]
    written = set()  # ids of the memory that calls write into
    for call in rec.calls:
        if _writes_into_arguments(call):
            written.update(id(owner[slot]) for slot in _reads(call))
    shared = {id(owner[slot]) for slot in outside}
    values, views, folded = set(), set(), set()
    for k, call in enumerate(rec.calls):
        if call[0] not in ("call", "forward") or _writes_into_arguments(call):
            continue
        results = _writes(call)
        if not results or any(id(owner[s]) in shared or s in outside for s in results):
            continue
        reads = _value_reads(call)
        if reads <= values:
            if any(id(owner[s]) in written for s in results) or _draws(call):
                continue
            values |= results
            folded.add(k)
        elif reads and reads <= (views | set(fixed)) and _is_view_op(call):
            roots = {id(owner[s]) for s in reads}
            if all(id(owner[s]) in roots for s in results):
                views |= results
                folded.add(k)
    constants = {}
    for slot in values:
        array = _plain(rec.objects[slot]).view()
        array.flags.writeable = False
        constants[slot] = array
    for slot in views:
        constants[slot] = _plain(rec.objects[slot])
    return constants, [c for k, c in enumerate(rec.calls) if k not in folded]


def _root(array):
    """The array that owns ``array``'s memory (the end of its chain of ``.base``)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _writes_into_arguments(call) -> bool:
    """A NumPy call or kernel that may change an array it is given: out=, no array result
    (``copyto``, a ufunc's ``.at``), item assignment, a kernel named ``..._`` (``sgd_update_``)."""
    kind, name = call[0], call[2]
    if kind != "call":
        return False
    last = name.rsplit(".", 1)[-1]  # numpy.add.__call__ is not a trailing-underscore kernel
    in_place_kernel = last.endswith("_") and not last.startswith("__")
    return "out" in call[4] or call[5] is None or name in _IN_PLACE or in_place_kernel


def _value_reads(call) -> set:
    """The slots whose values a call's results depend on (``ones_like`` reads a shape)."""
    if call[0] == "call" and call[2] in _FROM_SHAPE:
        args = call[3]
        return _refs(call[4], _refs(tuple(args[1:]), set()))
    return _reads(call)


def _is_view_op(call) -> bool:
    if call[0] == "call":
        return call[2] in _VIEW_CALLS
    return isinstance(call[1], _function.ViewFunction)


def _draws(call) -> bool:
    """A forward that keeps a random generator on its node (a replay must draw anew)."""
    if call[0] != "forward":
        return False
    return any(
        isinstance(v, (np.random.Generator, np.random.RandomState)) for v in vars(call[1]).values()
    )


def _dead_after(calls, kept: set) -> list:
    """For each call, the slots that no later call reads: a replay drops its reference to
    them right after it, so that NumPy's allocator hands their memory, still in the cache, to
    the next arrays (holding every intermediate until the end spreads a replay over several
    times the cache). ``kept`` (outputs, gradients, parameters) live to the end."""
    last = {}
    for k, call in enumerate(calls):
        for slot in _reads(call) | _writes(call):
            last[slot] = k
    dead = [[] for _ in calls]
    for slot, k in last.items():
        if slot not in kept:
            dead[k].append(slot)
    return [tuple(sorted(d)) for d in dead]


def _build(template, values):
    kind, body = template
    if kind == "tensor":
        return Tensor._wrap(values[body])
    if kind == "value":
        return body
    if kind is dict:
        return {k: _build(v, values) for k, v in body.items()}
    return kind(_build(v, values) for v in body)


def _resolver(template):
    """A function values -> ``template`` with its _Ref placeholders filled in."""
    if isinstance(template, _Ref):
        i = template.i
        return lambda values: values[i]
    if type(template) in (list, tuple):
        if not _has_ref(template):
            return lambda values: template
        parts = [_resolver(t) for t in template]
        kind = type(template)
        return lambda values: kind([p(values) for p in parts])
    if type(template) is dict:
        if not _has_ref(template):
            return lambda values: template
        parts = {k: _resolver(v) for k, v in template.items()}
        return lambda values: {k: p(values) for k, p in parts.items()}
    return lambda values: template


def _has_ref(template) -> bool:
    if isinstance(template, _Ref):
        return True
    if type(template) in (list, tuple):
        return any(_has_ref(t) for t in template)
    if type(template) is dict:
        return any(_has_ref(t) for t in template.values())
    return False


def _positional(template):
    """For a flat tuple of arguments: (slots or None per position, constants), else None."""
    if any(type(t) in (list, tuple, dict) and _has_ref(t) for t in template):
        return None
    return tuple(t.i if isinstance(t, _Ref) else None for t in template), template


def _compile(call, dead=()):
    """One recorded call as a function of the replay's values; it then drops the slots in
    ``dead``."""
    kind = call[0]
    if kind == "call":
        _, fn, _, args_t, kwargs_t, slots = call
        picks = [a.i if isinstance(a, _Ref) else None for a in args_t]
        if not kwargs_t and type(slots) is int and None not in picks:
            return _plain_call(fn, picks, slots, dead)  # a gradient sum, say
        run = _compile_call(call)
    elif kind == "forward":
        _, node, _, refs, params, slots, _, kept = call
        if not params and not kept and type(slots) is int:
            return _plain_call(node.forward, [r.i for r in refs], slots, dead)
        run = _compile_forward(call)
    elif kind == "bump":
        ref = call[1]

        def run(values):
            t = ref()
            if t is not None:
                t._bump()

    elif kind == "step":
        run = _compile_step(call)
    else:
        raise AssertionError(kind)
    return _dropping(run, dead) if dead else run


def _dropping(run, dead):
    if len(dead) == 1:
        (slot,) = dead

        def run_and_drop_one(values):
            run(values)
            values[slot] = None

        return run_and_drop_one

    def run_and_drop(values):
        run(values)
        for slot in dead:
            values[slot] = None

    return run_and_drop


def _compile_call(call):
    _, fn, _, args_t, kwargs_t, slots = call
    flat = _positional(args_t)
    kwargs_of = _resolver(kwargs_t) if kwargs_t else None
    if flat is not None:
        picks, consts = flat
        if all(p is not None for p in picks):

            def args_of(values, picks=picks):
                return [values[p] for p in picks]
        else:

            def args_of(values, picks=picks, consts=consts):
                return [c if p is None else values[p] for p, c in zip(picks, consts)]
    else:
        args_of = _resolver(args_t)
    store = _storer(slots)
    if kwargs_of is None:
        return lambda values: store(values, fn(*args_of(values)))
    return lambda values: store(values, fn(*args_of(values), **kwargs_of(values)))


def _compile_forward(call):
    _, node, _, refs, params, slots, single, kept = call
    picks = [r.i for r in refs]
    forward = node.forward
    param_of = {k: _resolver(v) for k, v in params.items()}
    store = _storer(slots)

    def run(values):
        for k, p in param_of.items():
            setattr(node, k, p(values))
        ys = forward(*[values[p] for p in picks])
        store(values, ys)
        for k, slot in kept:
            v = getattr(node, k)
            if type(slot) is int:
                values[slot] = v if type(v) is np.ndarray else np.asarray(v)
            else:
                for i, x in zip(slot, v):
                    values[i] = x

    return run


def _plain_call(forward, picks, out: int, dead):
    """The common call (an op's forward, a NumPy function): arrays in, one array out, nothing
    kept on the node; then the slots in ``dead`` are dropped. Spelled out per arity, in one
    function: the replay runs a hundred of these per W1 meta-iteration."""
    ndarray, asarray = np.ndarray, np.asarray
    if len(picks) == 1:
        (a,) = picks

        def run1(values):
            y = forward(values[a])
            values[out] = y if type(y) is ndarray else asarray(y)
            for slot in dead:
                values[slot] = None

        return run1
    if len(picks) == 2:
        a, b = picks

        def run2(values):
            y = forward(values[a], values[b])
            values[out] = y if type(y) is ndarray else asarray(y)
            for slot in dead:
                values[slot] = None

        return run2
    if len(picks) == 3:
        a, b, c = picks

        def run3(values):
            y = forward(values[a], values[b], values[c])
            values[out] = y if type(y) is ndarray else asarray(y)
            for slot in dead:
                values[slot] = None

        return run3

    def run(values):
        y = forward(*[values[p] for p in picks])
        values[out] = y if type(y) is ndarray else asarray(y)
        for slot in dead:
            values[slot] = None

    return run


def _compile_step(call):
    _, opt, _, bindings = call
    bindings = [(weakref.ref(p), slot) for p, slot in bindings]
    step = type(opt).step

    def run(values):
        for ref, slot in bindings:
            p = ref()
            if p is not None:
                p.grad = None if slot is None else Tensor._wrap(values[slot])
        step(opt)

    return run


def _storer(slots):
    """A function (values, result) that puts a call's result into its slots."""
    if slots is None:
        return lambda values, result: None
    if type(slots) is int:

        def store(values, result, slot=slots):
            values[slot] = result if type(result) is np.ndarray else np.asarray(result)

        return store

    def store_many(values, result, slots=slots):
        for slot, r in zip(slots, result):
            values[slot] = r if type(r) is np.ndarray else np.asarray(r)

    return store_many
