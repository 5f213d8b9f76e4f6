"""CUDA-graph replay for ``tm.capture``: a captured step on CuPy tensors, launched as CUDA graphs.

The CPU capture (tinymeta/capture.py) traces NumPy calls through an ndarray subclass; CuPy
has no such hook, and a computed array missed by a tracer would become a silent constant.
Here the driver finds the device work instead (PyTorch's way): the step runs eagerly while
its stream is captured (``cupy.cuda.Stream.begin_capture`` / ``end_capture``), so every
kernel it launches on that stream is recorded, wherever in Python it was launched.

* Call 1 (warm-up) runs the step eagerly, under capture.py's refusals (``.item()``,
  ``float(t)``, ``.numpy()``, random draws, ...), which name the op and the line. It also
  compiles the kernels and builds the library handles, which a capture must not do.
* Call 2 copies its inputs into static device buffers, runs the step on them under stream
  capture, in a private memory pool, and launches what was captured: that is its result.
* Later calls copy their inputs into the static buffers and launch the graphs.

What the host keeps doing on every call, outside the graphs:

* **Optimizer steps.** ``Optimizer.step()`` is recorded, not captured, and run after the
  launch, as the CPU replay does: Adam's step count and bias corrections are Python values
  that a graph would freeze. So reading a parameter after ``opt.step()`` in the step is
  refused (the graph would read it before the update).
* **Forwards CuPy will not capture.** CuPy refuses cuBLAS calls during a stream capture
  (``NotImplementedError``; cupy/cupy#6290). Small matmuls do not call it: they take
  tinymeta's own kernel (``tinymeta.kernels.matmul``; kernels/cuda/matmul.cu), which a graph
  holds, so a step whose products are all small (W1's) is one graph. A larger product calls
  cuBLAS (or every product, with ``TINYMETA_CUDA_MATMUL=cublas``). An op forward that raises
  the refusal ends the current graph: it runs eagerly between two graph launches, on the
  same static arrays, and its results (and the arrays it keeps for its backward) are copied
  into the arrays the next graph reads. A step is then a few graphs with matmuls between.
  ``GraphProgram.graphs`` and ``.eager_forwards`` count them.
* **Label-range checks** (cross-entropy's): they read values back, which a graph cannot;
  they run on the new labels before the launch when the labels are an input (or a view of
  one), and are refused when the step computes them.
* **Host-to-device copies** made inside the step (an index list turned into a device array)
  are made once, eagerly between two graphs, and become constants of the replay, as host
  arrays are constants of the CPU replay.

Memory: every array the graphs read or write is kept alive with them (the static inputs,
the arrays of every tensor alive when the step was captured, the arrays the step computed,
in a private ``cupy.cuda.MemoryPool`` used only while capturing, so that no block a graph
writes is ever handed to other code). A replay hands out copies: new output tensors and new
``.grad`` arrays, which later replays do not overwrite.

The host-side decisions (what is watched, which ``.grad`` a replay sets, which label checks
can run before a launch, what is refused) are made by :func:`plan` from the facts a
:class:`Facts` run records: the same code runs, and is tested, on CPU tensors.
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import threading
import traceback
import weakref

import numpy as np

from tinymeta import backend, kernels
from tinymeta import function as _function
from tinymeta.capture import CaptureError, register_cuda_path
from tinymeta.tensor import Tensor, swap_array

# This module applies capture.py's refusals (its recorder slot, read-back and random-draw
# patches, _where) and registers itself there as the path of steps on cuda (the last line).
# The module is reached through sys.modules: the package's `capture` attribute is the function.
_capture = sys.modules["tinymeta.capture"]

# cupy.random's functions over its global generator: refused while a step runs.
_CUPY_RANDOM = (
    "rand", "randn", "random", "random_sample", "ranf", "sample", "standard_normal", "normal",
    "uniform", "randint", "random_integers", "choice", "permutation", "shuffle", "binomial",
    "poisson", "exponential", "beta", "gamma", "bytes", "laplace", "logistic", "multinomial",
    "dirichlet", "geometric", "lognormal", "standard_t", "triangular",
)  # fmt: skip
# CuPy functions that copy host data to the device when handed a host array.
_HOST_TO_DEVICE = ("asarray", "array", "asanyarray", "ascontiguousarray")


# --- which path ---------------------------------------------------------------------------------


def on_cuda(args) -> bool:
    """Whether a captured step's inputs are on cuda (then it becomes CUDA graphs). The inputs
    decide: all of them on one device, else ``CaptureError``."""
    devices = {_device_of_input(a) for a in args} - {None}
    if len(devices) > 1:
        raise CaptureError(
            "capture: the inputs are on different devices "
            f"({', '.join(_describe(a) for a in args if _device_of_input(a))}); a captured "
            "step's inputs are all on cpu or all on cuda: move them with .to(device)"
        )
    return devices == {"cuda"}


def _device_of_input(a):
    if isinstance(a, Tensor):
        return "cuda" if backend.is_cupy_array(a._data) else "cpu"
    if isinstance(a, np.ndarray):
        return "cpu"
    if backend.is_cupy_array(a):
        return "cuda"
    return None


def _describe(a) -> str:
    kind = "tensor" if isinstance(a, Tensor) else type(a).__name__
    return f"{kind} on {_device_of_input(a)} of shape {tuple(a.shape)}"


def _input_array(a):
    return a._data if isinstance(a, Tensor) else a


# --- the facts of one run -----------------------------------------------------------------------


class Facts:
    """What one run of the step did, as the host sees it (``mode``: "warm-up", an eager run,
    or "capture"). Set as capture.py's active recorder, so that its refusals of read-backs
    and random draws apply; ``depth`` > 0 inside op forwards and the recorder's own calls."""

    def __init__(self, mode: str, is_device_array):
        self.mode = mode
        self.is_device_array = is_device_array
        self.depth = 0
        self.thread = threading.get_ident()
        self.tensors = []  # every device tensor alive when the run started
        self.grad_at_start = {}  # id(tensor) -> its .grad then
        self.grads_before = {}  # id(a .grad tensor then) -> (it, its tensor's shape)
        self.kept = []  # arrays a graph may read: kept alive with it
        self.read = {}  # id(tensor) -> (tensor, array): tensors from before that ops read
        self.steps = []  # (optimizer, [(parameter, its .grad array or None)])
        self.stepped = {}  # id(parameter) -> optimizer name, once stepped
        self.bumps = []  # weakrefs of tensors whose version the step bumped
        self.label_checks = []  # (labels array, n, c, op name, where)
        self.module_state = {}  # id(module) -> (module, plain attributes at the start)
        self.called_modules = set()  # capture._module_call fills it
        self.segments = None  # capture: a _Segments

    def scan(self) -> None:
        """Note every device tensor that exists, its array and its ``.grad``."""
        from tinymeta.nn.module import Module

        for obj in gc.get_objects():  # by type(obj), as in capture.py's scan
            kind = type(obj)
            if issubclass(kind, Tensor) and self.is_device_array(obj._data):
                self.tensors.append(obj)
                self.kept.append(obj._data)
                self.grad_at_start[id(obj)] = obj.grad
                if obj.grad is not None:
                    # held: a freed .grad's id could be a new tensor's
                    self.grads_before[id(obj.grad)] = (obj.grad, tuple(obj.shape))
                    self.kept.append(obj.grad._data)
            elif issubclass(kind, Module):
                self.module_state[id(obj)] = (obj, _capture._attributes(obj))

    def note_inputs(self, tensors) -> None:
        """The op reads ``tensors``: refuse a stale ``.grad`` or a parameter already stepped."""
        for t in tensors:
            if id(t) in self.grads_before:
                raise CaptureError(
                    f"capture: the step reads the .grad (shape {self.grads_before[id(t)][1]}) "
                    f"that a tensor had before the step started {_capture._where()}; a replay "
                    "would read that same stale .grad: call opt.zero_grad() in the step, "
                    "before the backward"
                )
            if id(t) in self.stepped:
                raise CaptureError(
                    f"capture: the step reads a parameter (shape {tuple(t.shape)}) after "
                    f"{self.stepped[id(t)]}.step() updated it {_capture._where()}; on cuda "
                    "the optimizer step runs after the captured graphs: make opt.step() the "
                    "last thing the step does"
                )
            if id(t) in self.grad_at_start and id(t) not in self.read:  # existed before
                self.read[id(t)] = (t, t._data)

    def note_step(self, opt) -> list:
        """The parameters ``opt.step()`` updates, each with its ``.grad`` array."""
        name = type(opt).__name__
        bindings = []
        for group in opt.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None and id(g) in self.grads_before:
                    raise CaptureError(
                        f"capture: {name}.step() updates a parameter (shape {tuple(p.shape)}) "
                        f"with a .grad that the step did not compute {_capture._where()}"
                    )
                bindings.append((p, None if g is None else g._data))
                if g is not None:  # a parameter without a .grad is not updated
                    self.stepped[id(p)] = name
        self.steps.append((opt, bindings))
        return bindings


def _facts():
    """The run being recorded on this thread, outside op forwards; else None."""
    facts = _capture._active
    if not isinstance(facts, Facts) or facts.depth or threading.get_ident() != facts.thread:
        return None
    return facts


def _on_apply(fn, tensors, arrays):
    """``function._capture_hook`` while a step runs: note what the op reads, run its forward
    (in a capture, through the segments, which run it eagerly when CuPy will not capture it)."""
    facts = _capture._active
    if facts.depth or threading.get_ident() != facts.thread:
        return fn.forward(*arrays)
    facts.note_inputs(tensors)
    before = dict(fn.__dict__)
    facts.depth += 1
    try:
        if facts.segments is not None:
            ys = facts.segments.forward(fn, arrays, before)
        else:
            ys = fn.forward(*arrays)
    finally:
        facts.depth -= 1
    _refuse_kept_numbers(fn, before)
    return ys


def _refuse_kept_numbers(fn, before) -> None:
    """A forward that keeps a Python number for its backward (a value read back, perhaps):
    a graph would freeze it. The CPU capture refuses it too."""
    for k, v in fn.__dict__.items():
        if before.get(k) is not v and isinstance(v, float):
            raise CaptureError(
                f"capture: {fn.op_name()}.forward keeps a Python number {k!r} for its "
                f"backward {_capture._where()}; it may depend on the values, which a replay "
                "would repeat: keep a 0-d array instead"
            )


# --- what is patched while the step runs -------------------------------------------------------


def _optimizer_step(original):
    def step(self, closure=None):
        facts = _facts()
        if facts is None:
            return original(self, closure)
        if closure is not None:
            raise CaptureError(f"capture: {type(self).__name__}.step(closure) {_capture._where()}")
        facts.note_step(self)
        if facts.mode == "capture":
            return None  # runs after the graphs are launched (see GraphProgram)
        facts.depth += 1
        try:
            return original(self)
        finally:
            facts.depth -= 1

    return step


def _bump(original):
    def bump(self):
        facts = _facts()
        if facts is not None:
            if id(self) in facts.grads_before:
                raise CaptureError(
                    f"capture: the step adds into the .grad (shape {tuple(self.shape)}) that a "
                    f"tensor had before the step started {_capture._where()}; a replay would "
                    "add into that same stale .grad: call opt.zero_grad() in the step"
                )
            facts.bumps.append(weakref.ref(self))
        return original(self)

    return bump


def _labels(original):
    """nn.functional._labels: its range check reads the labels back. Eagerly it runs as is;
    in a capture it is noted and runs before each launch (see plan)."""

    def labels(array, n, c, op, xp):
        facts = _capture._active
        if not isinstance(facts, Facts) or facts.mode != "capture":
            if isinstance(facts, Facts):
                facts.depth += 1
                try:
                    return original(array, n, c, op, xp)
                finally:
                    facts.depth -= 1
            return original(array, n, c, op, xp)
        data = array._data if isinstance(array, Tensor) else array
        facts.label_checks.append((data, n, c, op, _capture._where()))
        return xp.asarray(data, dtype=np.int64)

    return labels


def _refused_asnumpy(original):
    def asnumpy(a, *args, **kwargs):
        facts = _capture._active
        if isinstance(facts, Facts) and not facts.depth:
            raise CaptureError(
                f"capture: cupy.asnumpy() copies a device array to the host {_capture._where()}; "
                "a graph cannot hold a host transfer, and a replay would repeat the value"
            )
        return original(a, *args, **kwargs)

    return asnumpy


def _host_to_device(name, original):
    """cupy.asarray & co. of host data while capturing: made once, eagerly, between two
    graphs (a constant of the replay); of device data: as usual."""

    def convert(obj, *args, **kwargs):
        facts = _capture._active
        if (
            not isinstance(facts, Facts)
            or facts.segments is None
            or backend.is_cupy_array(obj)
            or threading.get_ident() != facts.thread
        ):
            return original(obj, *args, **kwargs)
        return facts.segments.eagerly(lambda: original(obj, *args, **kwargs))

    convert.__name__ = name
    return convert


class _Patches(_capture.PatchSet):
    """What a run of the step swaps in while it runs, and back."""

    def __init__(self, facts: Facts):
        super().__init__()
        self.facts = facts

    def __enter__(self):
        from tinymeta.nn import functional
        from tinymeta.nn.module import Module
        from tinymeta.optim.optimizer import Optimizer

        patch = self.patch
        _capture.refuse_read_backs_and_draws(patch)
        patch(Optimizer, "step", _optimizer_step(Optimizer.__dict__["step"]))
        patch(Tensor, "_bump", _bump(Tensor.__dict__["_bump"]))
        patch(Module, "__call__", _capture._module_call(Module.__dict__["__call__"]))
        patch(functional, "_labels", _labels(functional._labels))
        cp = backend.cupy_or_none()
        if cp is not None:
            for name in _CUPY_RANDOM:
                if hasattr(cp.random, name):
                    patch(
                        cp.random,
                        name,
                        _capture._refuse(f"cupy.random.{name}() draws random numbers"),
                    )
            patch(cp, "asnumpy", _refused_asnumpy(cp.asnumpy))
            for name in _HOST_TO_DEVICE:
                patch(cp, name, _host_to_device(name, getattr(cp, name)))
        _function._capture_hook = _on_apply
        _capture._active = self.facts
        return self

    def __exit__(self, *exc):
        _capture._active = None
        _function._capture_hook = None
        self.restore()
        return False


def run(step_fn, call_args, facts: Facts):
    """Run ``step_fn(*call_args)`` while ``facts`` records; returns its result."""
    if _capture._active is not None:
        raise CaptureError("capture: a captured step called inside another captured step")
    facts.scan()
    with _Patches(facts):
        return step_fn(*call_args)


# --- the capture: graphs, and the forwards run between them ------------------------------------


class _Segments:
    """The graphs of one capture, in order, and what runs eagerly between them.

    ``replay`` is a list of ("graph", cupy Graph) and ("eager", callable) entries. Each graph
    is launched as soon as it is captured, so that a forward run eagerly after it sees real
    values: the capturing call computes its result the way every replay will."""

    def __init__(self, cp, stream, marker):
        self.cp, self.stream = cp, stream
        self.marker = marker  # a 1-element array: each graph writes it, so none is empty
        self.replay = []
        self.constants = []  # host data copied to the device while capturing
        self.capturing = False

    def begin(self) -> None:
        self.stream.begin_capture()
        self.capturing = True

    def cut(self) -> None:
        """End the graph being captured and launch it."""
        self.marker.fill(0)
        self.capturing = False
        graph = self.stream.end_capture()
        self.replay.append(("graph", graph))
        graph.launch(stream=self.stream)

    def abort(self) -> None:
        """End a capture that failed; whatever it recorded is dropped."""
        if self.capturing:
            self.capturing = False
            try:
                self.stream.end_capture()
            except Exception:  # an invalidated capture: the error that invalidated it is raised
                pass

    def eagerly(self, make):
        """Run ``make()`` between two graphs, once: its result is a constant of the replay
        (inside a forward run eagerly, it is run again on every replay)."""
        if not self.capturing:
            return make()
        self.cut()
        try:
            constant = make()
        finally:
            self.begin()
        self.constants.append(constant)
        return constant

    def forward(self, fn, arrays, before):
        """Run ``fn``'s forward into the graph, or eagerly between two graphs when CuPy
        refuses to capture it (a cuBLAS call); then every replay runs it there as well."""
        try:
            return fn.forward(*arrays)
        except CaptureError:
            raise
        except (NotImplementedError, RuntimeError) as e:
            # CuPy refuses cuBLAS while capturing (NotImplementedError); a driver error that
            # invalidated the capture makes the cut below fail, loudly.
            if "captur" not in str(e):
                raise
        # The refused forward may have captured kernels before its library call: they stay
        # in the graph, writing memory nothing reads. Its node is put back as it was.
        fn.__dict__.clear()
        fn.__dict__.update(before)
        self.cut()
        try:
            ys = fn.forward(*arrays)
        finally:
            self.begin()
        node = copy.copy(fn)
        kept = {
            k: v
            for k, v in fn.__dict__.items()
            if before.get(k) is not v and _is_array_or_arrays(v)
        }
        outputs = ys if type(ys) is tuple else (ys,)
        matmul = kernels.cuda_matmul_setting()
        run = _eager_forward(self.cp, node, list(arrays), outputs, kept, matmul)
        self.replay.append(("eager", run))
        return ys


def _is_array_or_arrays(v) -> bool:
    if backend.is_cupy_array(v):
        return True
    return type(v) in (tuple, list) and bool(v) and all(backend.is_cupy_array(x) for x in v)


def _eager_forward(cp, node, inputs, outputs, kept, matmul_setting: str):
    """A forward rerun between two graphs: its results and the arrays it keeps for its
    backward are copied into the arrays that the capturing call made (which the graphs read).
    It runs under the CUDA matmul setting of the capture (kernels.set_cuda_matmul), so that
    its products are done as they were then, whatever the setting is now."""

    def run():
        previous = kernels.set_cuda_matmul(matmul_setting)
        try:
            ys = node.forward(*inputs)
        finally:
            kernels.set_cuda_matmul(previous)
        for static, y in zip(outputs, ys if type(ys) is tuple else (ys,)):
            cp.copyto(static, y)
        for k, static in kept.items():
            new = getattr(node, k)
            for s, n in zip(static, new) if type(static) in (tuple, list) else ((static, new),):
                cp.copyto(s, n)

    return run


# --- the plan: pure host-side decisions from the facts ------------------------------------------


class Plan:
    """What a replay does besides launching: every field a decision made from the facts."""

    def __init__(self):
        self.outputs = None  # template of the result: ("tensor", array) / ("value", v) / ...
        self.grads = []  # (weakref tensor, .grad array the step left, or None)
        self.input_grads = []  # (input position, .grad array or None)
        self.steps = []  # (optimizer, [(weakref parameter, grad array or None)])
        self.watched = []  # (weakref tensor, the array a graph reads through it)
        self.label_checks = []  # (labels array, n, c, op): run before each launch
        self.bumps = []
        self.modules = []  # (weakref module, plain attributes)
        self.optimizers = []  # (weakref optimizer, ids of its parameters)
        self.kept = []  # arrays kept alive with the graphs


def plan(facts: Facts, result, input_tensors: dict, static_inputs: list) -> Plan:
    """The replay's plan from a run's facts. ``input_tensors``: position -> the tensor passed
    in; ``static_inputs``: the arrays the inputs are copied into before each launch."""
    p = Plan()
    p.outputs = _output_template(result, facts.is_device_array)
    input_ids = {id(t) for t in input_tensors.values()}
    for t in facts.tensors:
        if id(t) in input_ids:
            continue
        before, now = facts.grad_at_start[id(t)], t.grad
        if now is not before:
            p.grads.append((weakref.ref(t), None if now is None else now._data))
    for i, t in input_tensors.items():
        if t.grad is not facts.grad_at_start.get(id(t)):
            p.input_grads.append((i, None if t.grad is None else t.grad._data))
    p.steps = [(opt, [(weakref.ref(q), g) for q, g in bindings]) for opt, bindings in facts.steps]
    p.optimizers = [(weakref.ref(opt), _capture._optimized(opt)) for opt, _ in facts.steps]
    p.watched = [(weakref.ref(t), a) for i, (t, a) in facts.read.items() if i not in input_ids]
    p.label_checks = _label_checks(facts, static_inputs)
    p.bumps = list(facts.bumps)
    p.modules = [
        (weakref.ref(m), attributes)
        for i, (m, attributes) in facts.module_state.items()
        if i in facts.called_modules
    ]
    p.kept = facts.kept + list(static_inputs) + [a for _, a in p.watched]
    return p


def _output_template(result, is_device_array):
    if isinstance(result, Tensor):
        return ("tensor", result._data)
    if type(result) in (tuple, list):
        return (type(result), [_output_template(r, is_device_array) for r in result])
    if type(result) is dict:
        return (dict, {k: _output_template(v, is_device_array) for k, v in result.items()})
    if isinstance(result, np.ndarray) or is_device_array(result):
        raise CaptureError("capture: the step returns an array; return tensors")
    return ("value", result)


def _root(array):
    """The array that owns ``array``'s memory (the end of its chain of ``.base``)."""
    while getattr(array, "base", None) is not None:
        array = array.base
    return array


def _label_checks(facts: Facts, static_inputs: list) -> list:
    """The label-range checks a replay can run before its launch: on labels that are an input
    or an array that existed before the step (or views of them). Labels the step computes
    exist only once the graph ran: refused."""
    known = {id(_root(a)) for a in list(static_inputs) + facts.kept}
    checks = []
    for array, n, c, op, where in facts.label_checks:
        if id(_root(array)) not in known:
            raise CaptureError(
                f"capture: {op} checks that its labels lie in [0, {c}), which reads them "
                f"back, on labels the step computes {where}; a CUDA graph cannot read back: "
                "pass the labels in as an input"
            )
        checks.append((array, n, c, op))
    return checks


# --- errors raised while capturing --------------------------------------------------------------


def _explained(error: BaseException, while_capturing: bool = False) -> BaseException:
    """A CuPy or driver error raised by a capture (or any RuntimeError raised while a stream
    was captured: the warm-up ran the same code without it), as a CaptureError naming what
    failed and the line of user code; other errors as they are."""
    if isinstance(error, CaptureError):
        return error
    module = type(error).__module__ or ""
    from_capture = (
        while_capturing or module.startswith(("cupy", "cupy_backends")) or "captur" in str(error)
    )
    if not from_capture or not isinstance(error, (RuntimeError, NotImplementedError)):
        return error
    return CaptureError(
        f"capture: {type(error).__name__}: {error} {_where_in(error.__traceback__)}; inside a "
        "CUDA graph the step may not copy to the host, synchronise (a .get(), float(a) or "
        "bool(a) of a CuPy array, boolean indexing, nonzero) or call a library CuPy does not "
        "capture outside an op's forward (a matmul of raw CuPy arrays): keep it out of the "
        "captured step"
    )


def _where_in(tb) -> str:
    """'in <function> (file:line), called from <user file>:<line>' for a traceback."""
    here = os.path.dirname(os.path.abspath(__file__))
    inner, user = None, None
    for frame, line in traceback.walk_tb(tb):
        path = os.path.abspath(frame.f_code.co_filename)
        if _is_library(frame.f_code.co_filename) or path == os.path.abspath(__file__):
            continue
        if path.startswith(here) or "/kernels/" in path:
            where = os.path.relpath(path, os.path.dirname(here))
            inner = f"{frame.f_code.co_name} ({where}:{line})"
        else:
            user, inner = f"{frame.f_code.co_filename}:{line}", None
    if user is None:
        return f"in {inner}" if inner else "(no user frame)"
    return f"in {inner}, called from {user}" if inner else f"at {user}"


def _is_library(filename: str) -> bool:
    """NumPy's and CuPy's frames (CuPy's compiled ones name a relative .pyx file)."""
    if filename.endswith((".pyx", ".pxd", ".pxi")):
        return True
    path = os.path.abspath(filename)
    parts = path.split(os.sep)
    return (
        path.startswith(os.path.dirname(np.__file__)) or "cupy" in parts or "cupy_backends" in parts
    )


# --- the program ----------------------------------------------------------------------------------


def warm_up(step_fn, args, key):
    """The first call of a step on cuda: run it eagerly under the refusals; returns (its
    result, the program that captures on the next call)."""
    cp = backend.cupy_or_none()
    if cp is None:
        raise CaptureError("capture: cuda inputs but CuPy or a CUDA GPU is not available")
    _release_retired()
    facts = Facts("warm-up", lambda a: isinstance(a, cp.ndarray))
    call_args = [Tensor._wrap(a) if isinstance(a, cp.ndarray) else a for a in args]
    input_tensors = {i: a for i, a in enumerate(args) if isinstance(a, Tensor)}
    result = run(step_fn, call_args, facts)
    p = plan(facts, result, input_tensors, [])
    program = GraphProgram(step_fn, key, p)
    return _build(p.outputs, copy=False), program


class GraphProgram:
    """A captured step on cuda: the graphs (captured on the second call), their memory, and
    the plan of what a replay does around the launches."""

    def __init__(self, step_fn, key, warm_plan: Plan):
        self.step_fn = step_fn
        self.key = key
        self.python_state = ()  # set by Captured, as for the CPU program
        self.plan = warm_plan  # until captured: what the warm-up read (for state_unchanged)
        self.replay_list = None  # the _Segments' entries once captured
        self.static_inputs = None
        self.pool = self.stream = None
        self.names = ["warm-up (eager)"]

    def __len__(self):
        return len(self.names)

    @property
    def graphs(self) -> int:
        """The CUDA graphs a replay launches (0 until captured)."""
        return sum(kind == "graph" for kind, _ in self.replay_list or ())

    @property
    def eager_forwards(self) -> int:
        """The op forwards a replay runs eagerly between its graphs (cuBLAS calls)."""
        return sum(kind == "eager" for kind, _ in self.replay_list or ())

    def state_unchanged(self) -> bool:
        return _state_unchanged(self.plan)

    def replay(self, args):
        if self.replay_list is None:
            return self._capture(args)
        from tinymeta.nn.functional import _labels as check_labels

        cp = backend.cupy_or_none()
        self._copy_inputs(cp, args)
        for array, n, c, op in self.plan.label_checks:  # as eagerly: ValueError out of range
            check_labels(array, n, c, op, cp)
        stream = cp.cuda.get_current_stream()
        for kind, entry in self.replay_list:
            if kind == "graph":
                entry.launch(stream=stream)
            else:
                entry()
        for ref in self.plan.bumps:
            t = ref()
            if t is not None:
                t._bump()
        return self._finish(args)

    def _copy_inputs(self, cp, args):
        for static, a in zip(self.static_inputs, args):
            if static is not None:
                cp.copyto(static, _input_array(a))

    def _capture(self, args):
        cp = backend.cupy_or_none()
        _release_retired()
        self.pool = cp.cuda.MemoryPool()
        self.stream = cp.cuda.Stream(non_blocking=True)
        with cp.cuda.using_allocator(self.pool.malloc):
            marker = cp.zeros(1, np.int8)
            marker.fill(0)  # whatever fill launches is loaded now, not while capturing
            self.static_inputs = [
                cp.empty(_input_array(a).shape, _input_array(a).dtype)
                if _device_of_input(a) == "cuda" else None
                for a in args
            ]  # fmt: skip
        self._copy_inputs(cp, args)
        facts = Facts("capture", lambda a: isinstance(a, cp.ndarray))
        facts.segments = _Segments(cp, self.stream, marker)
        swapped, call_args, input_tensors = [], [], {}
        for i, (a, static) in enumerate(zip(args, self.static_inputs)):
            if isinstance(a, Tensor):
                swapped.append((a, a._data))
                swap_array(a, static)
                input_tensors[i] = a
                call_args.append(a)
            else:
                call_args.append(Tensor._wrap(static) if static is not None else a)
        user_stream = cp.cuda.get_current_stream()
        self.stream.wait_event(user_stream.record())  # the input copies come first
        try:
            with cp.cuda.using_allocator(self.pool.malloc), self.stream:
                result = self._run_captured(facts, call_args)
        finally:
            for t, own in swapped:
                swap_array(t, own)
        user_stream.wait_event(self.stream.record())
        self.plan = plan(
            facts, result, input_tensors, [s for s in self.static_inputs if s is not None]
        )
        self.replay_list = facts.segments.replay
        self.constants = facts.segments.constants
        self.names = [f"{self.graphs} CUDA graph(s)"] + [
            f"{type(opt).__name__}.step" for opt, _ in self.plan.steps
        ]
        weakref.finalize(self, _retire, self.pool)
        return self._finish(args)

    def _run_captured(self, facts, call_args):
        segments = facts.segments
        segments.begin()
        try:
            result = run(self.step_fn, call_args, facts)
            segments.cut()
        except BaseException as e:
            while_capturing = segments.capturing
            segments.abort()
            _retire(self.pool)  # arrays of the failed run may live on (in the traceback)
            for t in facts.tensors:  # .grad as before the run, not arrays never computed
                t.grad = facts.grad_at_start[id(t)]
            error = _explained(e, while_capturing)
            if error is e:
                raise
            raise error from e
        return result

    def _finish(self, args):
        """After the launches: hand out copies of the gradients, step the optimizers, build
        the result from copies of the outputs."""
        copies = {}

        def fresh(array):
            if array is None:
                return None
            c = copies.get(id(array))
            if c is None:
                c = copies[id(array)] = Tensor._wrap(array.copy())
            return c

        for opt, bindings in self.plan.steps:
            for ref, g in bindings:
                q = ref()
                if q is not None:
                    q.grad = fresh(g)
            opt.step()
        for ref, g in self.plan.grads:
            t = ref()
            if t is not None:
                t.grad = fresh(g)
        for i, g in self.plan.input_grads:
            if isinstance(args[i], Tensor):
                args[i].grad = fresh(g)
        return _build(self.plan.outputs, copy=True)


def _state_unchanged(p: Plan) -> bool:
    """Whether what the graphs read is as when they were captured (see capture.py)."""
    return _capture.state_unchanged(p.watched, p.modules, p.optimizers)


def _build(template, copy: bool):
    kind, body = template
    if kind == "tensor":
        return Tensor._wrap(body.copy() if copy else body)
    if kind == "value":
        return body
    if kind is dict:
        return {k: _build(v, copy) for k, v in body.items()}
    return kind(_build(v, copy) for v in body)


# Private pools of dropped programs. A pool is released (its free blocks given back with
# cudaFree) only before a warm-up or a capture begins: a program may be collected in the middle
# of another step's capture, where cudaFree is not allowed; and a pool whose arrays are still
# used somewhere (a tensor the step stored) is kept until they are gone.
_retired = []


def _retire(pool) -> None:
    _retired.append(pool)


def _release_retired() -> None:
    for pool in _retired:
        pool.free_all_blocks()
    _retired[:] = [pool for pool in _retired if pool.used_bytes() > 0]


__all__ = ["Facts", "GraphProgram", "Plan", "on_cuda", "plan", "run", "warm_up"]


register_cuda_path(sys.modules[__name__])
