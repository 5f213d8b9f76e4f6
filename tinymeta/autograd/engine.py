"""The backward pass: ``grad`` and ``backward``.

The engine walks the graph from the outputs to the inputs in reverse
topological order. Every Function has a *generation* (one more than the
newest of its inputs' creators), so sorting the reachable Functions by
generation, newest first, processes each one only after all of its consumers
have delivered their gradients. No recursion: a 100,000-op chain is a loop.

Each Function's ``backward`` runs with grad mode = ``create_graph``. When it is
on, the gradient computation is itself recorded, which is all it takes to get
derivatives of any order.
"""

from __future__ import annotations

import operator
import weakref
from itertools import compress

import numpy as np

from tinymeta import function, grad_mode
from tinymeta import tensor as tensor_module
from tinymeta.autograd.first_order import is_first_order
from tinymeta.backend import get_array_module
from tinymeta.function import _counter_of, _first, versions
from tinymeta.tensor import RETAIN_GRAD, Tensor, is_graph_memory

FREED_MESSAGE = (
    "Trying to backward through the graph a second time (or to use a graph whose saved "
    "tensors were freed by an earlier backward). Pass retain_graph=True to the first "
    "backward/grad call if you need to go through the graph again."
)


def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False) -> None:
    """Accumulate gradients of ``tensors`` into ``.grad`` of the leaves that require grad."""
    roots, root_grads = _roots_and_seeds(tensors, grad_tensors, "backward")
    retain_graph = create_graph if retain_graph is None else retain_graph
    create_graph = create_graph and not is_first_order()  # first_order_inner_grads()
    hooked = set()  # owners of the arrays that hooks were handed (see _run_hooks)
    grads = _run(roots, root_grads, None, retain_graph, create_graph, hooked)
    for leaf, g in grads.values():  # checked before any .grad changes
        if leaf.grad is not None and leaf.grad.shape != g.shape:  # assigned by hand
            raise RuntimeError(
                f"backward: a leaf of shape {leaf.shape} has a .grad of shape "
                f"{leaf.grad.shape}, which the sum would broadcast; a gradient must have its "
                "tensor's shape (set .grad to None or to a tensor of that shape)"
            )
    first = []  # leaves without a gradient yet: they take theirs as it is, if it is theirs
    for leaf, g in grads.values():
        if leaf.grad is None:
            first.append((leaf, g))
        elif create_graph:  # a recorded sum: the gradient stays differentiable
            leaf.grad = _recorded_sum(leaf.grad, g)
        else:
            leaf.grad = _accumulated(leaf.grad, g)
    owned = _own_memory([g for _, g in first], root_grads, create_graph, hooked)
    for (leaf, _), g in zip(first, owned):
        leaf.grad = g


def _recorded_sum(grad: Tensor, g: Tensor) -> Tensor:
    """``grad + g`` recorded whatever the caller's grad mode: a ``backward(create_graph=True)``
    called under ``no_grad`` left ``.grad`` without its graph (silently first order)."""
    token = grad_mode._enabled.set(True)
    try:
        return grad + g
    finally:
        grad_mode._enabled.reset(token)


def _accumulated(grad: Tensor, g: Tensor) -> Tensor:
    """``grad + g`` written into ``grad``'s memory, as PyTorch accumulates without
    ``create_graph``: a reference to ``.grad`` taken before sees the sum. A new tensor where
    writing would be wrong: a ``.grad`` that a graph computed (``backward(create_graph=True)``
    made it) or an alias of such memory, a read-only array, or a sum of another dtype."""
    a, b = grad._data, g._data
    if (
        grad.grad_fn is not None
        or is_graph_memory(grad._vc)
        or not getattr(a.flags, "writeable", True)
        or a.dtype != b.dtype
        or a.shape != b.shape
    ):
        return Tensor._wrap(a + b)
    a += b
    return grad._bump()  # graphs that saved the old .grad see the change


def _own_memory(grads: list, root_grads: list, create_graph: bool, hooked=()) -> list:
    """``grads`` (None allowed), each writable and over memory that nothing else sees.

    Optimizers, clip_grad_norm_ and users change gradients in place, so a gradient must
    not be a read-only broadcast view (what the backward of a sum or mean gives), nor
    share memory with another gradient handed out (x + y hands both the same array),
    nor with a gradient passed in (``grad_outputs``), nor with a gradient that a hook was
    handed (``hooked``: ids of owning arrays; a hook that keeps its argument must not see
    a later backward add into .grad, nor an optimizer's writes). Only those are copied;
    with ``create_graph`` the copy is a recorded op, so the gradient stays differentiable.
    """
    # (._data: internal reads hand no array out; see Tensor.data)
    taken = {id(_owner(g._data)) for g in root_grads}
    taken.update(hooked)
    out = []
    for g in grads:
        if g is not None:
            a = g._data
            if a.base is None:  # owns its memory: not a broadcast view
                owner = id(a)
                shared = owner in taken
            else:  # a view: of what, and is it a (read-only) broadcast?
                owner = id(a.base)
                shared = owner in taken or 0 in a.strides  # CuPy has no read-only flag
            if shared or not getattr(a.flags, "writeable", True):
                g = _copy(g, create_graph)
                owner = id(g._data)
            taken.add(owner)
        out.append(g)
    return out


def _copy(g: Tensor, create_graph: bool) -> Tensor:
    if create_graph and g.requires_grad:
        from tinymeta.ops.shape import Copy

        token = grad_mode._enabled.set(True)
        try:
            return Copy.apply(g)
        finally:
            grad_mode._enabled.reset(token)
    return Tensor._wrap(g._data.copy())


def _owner(array):
    """The array that owns ``array``'s memory (itself unless it is a view)."""
    return array if array.base is None else array.base


def grad(
    outputs,
    inputs,
    grad_outputs=None,
    retain_graph=None,
    create_graph=False,
    allow_unused=False,
) -> tuple:
    """The gradients of ``outputs`` w.r.t. each of ``inputs``, as a tuple.

    Nothing is accumulated into ``.grad``. With ``create_graph=True`` the
    returned gradients are differentiable. An input that the outputs do not
    depend on raises, unless ``allow_unused=True`` (its gradient is then None).
    """
    roots, root_grads = _roots_and_seeds(outputs, grad_outputs, "grad")
    inputs = _as_tuple(inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"grad: inputs[{i}] is a {type(x).__name__}, expected a Tensor")
        if not x.requires_grad:
            raise RuntimeError(f"grad: inputs[{i}] (shape {x.shape}) does not require grad")
    retain_graph = create_graph if retain_graph is None else retain_graph
    create_graph = create_graph and not is_first_order()  # first_order_inner_grads()
    hooked = set()
    grads = _run(roots, root_grads, inputs, retain_graph, create_graph, hooked)
    result = []
    for i, x in enumerate(inputs):
        entry = grads.get(id(x))
        if entry is None:
            if not allow_unused:
                raise RuntimeError(
                    f"grad: inputs[{i}] (shape {x.shape}) was not used to compute the outputs; "
                    "pass allow_unused=True to get None for it"
                )
            result.append(None)
        else:
            result.append(entry[1])
    return tuple(_own_memory(result, root_grads, create_graph, hooked))


# --- the engine -----------------------------------------------------------------


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _roots_and_seeds(outputs, grad_outputs, caller: str):
    """Check the outputs and build the gradient each one starts with."""
    roots = _as_tuple(outputs)
    seeds = _as_tuple(grad_outputs) if grad_outputs is not None else (None,) * len(roots)
    if len(seeds) != len(roots):
        raise ValueError(f"{caller}: got {len(roots)} outputs but {len(seeds)} output gradients")
    root_grads = []
    for i, (y, g) in enumerate(zip(roots, seeds)):
        if not isinstance(y, Tensor):
            raise TypeError(f"{caller}: outputs[{i}] is a {type(y).__name__}, expected a Tensor")
        if not y.requires_grad:
            raise RuntimeError(
                f"{caller}: outputs[{i}] (shape {y.shape}) does not require grad and has no "
                "grad_fn: nothing it depends on requires grad"
            )
        if g is None:
            if y.size != 1:
                raise RuntimeError(
                    f"{caller}: outputs[{i}] has shape {y.shape}; a gradient can be implicitly "
                    "created only for a scalar output: pass the output gradient explicitly"
                )
            g = Tensor._wrap(_ones_like(y._data))
        else:
            g = g if isinstance(g, Tensor) else Tensor(g)
            if g.shape != y.shape:
                raise ValueError(
                    f"{caller}: the gradient for outputs[{i}] has shape {g.shape}, "
                    f"expected {y.shape}"
                )
        root_grads.append(g)
    return roots, root_grads


def _ones_like(array):
    if type(array) is np.ndarray:  # np.ones_like's dispatch costs more than the array itself
        ones = np.empty(array.shape, array.dtype)
        ones.fill(1)
        return ones
    return get_array_module(array).ones_like(array)


def _edges(fn):
    """(input tensor or None, its creator) for each input of ``fn``.

    A node freed by an earlier backward keeps only weak references to its
    inputs and their creators, so the walk can still tell where it leads.
    """
    if fn.inputs is not None:
        return [(x, x.grad_fn) for x in fn.inputs]
    return [(ref(), creator) for ref, creator in fn.freed_edges]


def _collect(roots, targets):
    """The Functions that the backward pass has to run, newest first.

    With ``targets`` (the tensors ``grad`` was asked about) only Functions from
    which a target can be reached are kept, and a Function whose generation is
    below every target's is not walked past: it cannot lead to one.
    """
    min_target_generation = min([t.generation for t in targets.values()]) if targets else 0
    seen = set()  # Functions hash by identity (only tensors redefine ==)
    order = []
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    replaced = tensor_module.graph_data_replaced  # some computed tensor's .data assigned
    if replaced:
        for r in roots:
            _check_not_replaced(r, "backward from a tensor", None)
    stale_possible = function.inplace_recorded  # (read once: nothing records during the walk)
    freed_seen = False
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        order.append(fn)
        inputs = fn.inputs
        if inputs is None:
            freed_seen = True
        else:
            if stale_possible:
                _check_no_stale_inputs(fn)
            if replaced:
                for i, (x, need) in enumerate(zip(inputs, fn.needs_input_grad)):
                    if need:
                        _check_not_replaced(x, f"{fn.op_name()}: input {i}", fn.seq)
        if fn.generation < min_target_generation:
            continue
        # The creators of the inputs fn hands a gradient to (_edges(fn) without the tensors
        # and without inputs that did not require grad when fn was recorded: an in-place
        # assignment may have given one a creator since, which fn owes nothing)
        if inputs is not None:
            creators = map(_grad_fn_of, compress(inputs, fn.needs_input_grad))
        else:
            creators = fn.freed_creators
        for creator in creators:
            if creator is not None and creator not in seen:
                stack.append(creator)
    order.sort(key=_generation)  # an input's creator comes before its consumers

    if targets:
        needed = set()
        for fn in order:  # oldest first: the creators of fn's inputs are already decided
            inputs = fn.inputs
            if inputs is None:
                if _leads_to_target(fn, needed, targets):
                    needed.add(fn)
                continue
            for x in inputs:  # _leads_to_target inlined: this runs for every node
                if id(x) in targets or x.grad_fn in needed:
                    needed.add(fn)
                    break
        order = [fn for fn in order if fn in needed]
    order.reverse()
    if freed_seen:  # a node freed by an earlier backward is fine only where it is not run
        for fn in order:
            if fn.inputs is None:
                raise RuntimeError(FREED_MESSAGE)
    return order


def _check_no_stale_inputs(fn):
    """Refuse a node that used a tensor which an in-place op (``x[i] = v``) has given a new
    creator since: its gradient would reach the new creator instead of the old one."""
    for i, (x, need) in enumerate(zip(fn.inputs, fn.needs_input_grad)):
        creator = x.grad_fn
        if need and creator is not None and creator.seq > fn.seq:
            change = getattr(creator, "changed_by", "__setitem__")  # add_, x[...] = v, ...
            change = "x[...] = value" if change == "__setitem__" else f"x.{change}(...)"
            raise RuntimeError(
                f"{fn.op_name()}: input {i} (shape {x.shape}, dtype {x.dtype}) was changed "
                f"in place by a recorded {creator.op_name()} ({change}) after "
                f"{fn.op_name()} used it, and has a new creator since: its gradient "
                "cannot be routed. Use the tensor after the assignment, or assign into a "
                "copy (y = x * 1.0; y[i] = v)."
            )


def _check_not_replaced(x, use: str, seq) -> None:
    """Refuse a gradient that would reach ``x``'s creator from a use of ``x`` (by the node
    recorded ``seq``-th; None: now) made after ``x.data`` was replaced: the values used
    are not the creator's output. (Uses from before the assignment saw the creator's.)"""
    creator = x.grad_fn
    replaced_seq = getattr(x._vc, "replaced_seq", None)
    if creator is None or replaced_seq is None or replaced_seq < creator.seq:
        return
    if seq is not None and seq < replaced_seq:
        return
    name = creator.op_name()
    raise RuntimeError(
        f"{use} (shape {x.shape}, dtype {x.dtype}) had its .data replaced after {name} "
        f"computed it: the values used are not {name}'s output, so no gradient can flow "
        f"back through {name}. Use x.detach() to take the new values as a constant, or "
        "recompute the forward."
    )


def _leads_to_target(fn, needed, targets) -> bool:
    """Whether an input of ``fn`` is a target or was made by a node that leads to one."""
    if fn.inputs is None:  # freed by an earlier backward: only its edges are left
        return any(
            creator in needed or (x is not None and id(x) in targets) for x, creator in _edges(fn)
        )
    for x in fn.inputs:  # _edges(fn) without building the pairs
        if id(x) in targets or x.grad_fn in needed:
            return True
    return False


_generation = operator.attrgetter("generation")
_grad_fn_of = operator.attrgetter("grad_fn")


def _run(roots, root_grads, inputs, retain_graph, create_graph, hooked):
    """Propagate gradients; returns {id(tensor): (tensor, grad)} for leaves or ``inputs``.
    ``hooked`` gets the ids of the arrays that hooks were handed."""
    targets = {id(x): x for x in inputs} if inputs is not None else {}
    order = _collect(roots, targets)

    # id(tensor) -> (tensor, accumulated gradient); the tensor is kept so its id stays unique.
    grads: dict[int, tuple] = {}
    for y, g in zip(roots, root_grads):
        _accumulate(grads, y, g)

    result: dict[int, tuple] = {}
    # Keep the outputs of multi-output nodes alive until their node has run: freeing a
    # consumer node drops its references to its inputs, which may be such outputs, and a
    # rule may read one that no gradient reached. (A one-output node is run only when a
    # gradient reached its output, and the gradient's entry keeps the output alive: its
    # rule reads it through the node's weak reference, see Function.output.)
    for fn in order:
        if fn._output is None:  # (a recorded node has one output reference or several)
            fn._held_outputs = tuple([ref() for ref in fn._outputs])
    try:
        _propagate(order, grads, targets, result, retain_graph, create_graph, hooked)
    except BaseException:
        for fn in order:
            fn._held_outputs = None
        raise

    # What is left: gradients of leaves (backward) or of the requested inputs (grad). Their
    # hooks run in the walk's grad mode (create_graph), as PyTorch's do and as the hooks on
    # intermediate values do: in the caller's mode, a hook's ``g * w`` gave .grad a graph
    # after a plain backward, and lost it after backward(create_graph=True) under no_grad.
    mode = grad_mode._enabled.set(create_graph)
    try:
        for key, (x, g) in grads.items():
            if inputs is None:
                if x.grad_fn is None and x.requires_grad:  # a leaf that requires grad
                    result[key] = (x, _run_hooks(x, g, hooked))
            elif key in targets:
                result[key] = (x, _run_hooks(x, g, hooked))
    finally:
        grad_mode._enabled.reset(mode)
    return result


def _propagate(order, grads, targets, result, retain_graph, create_graph, hooked):
    """Run each node's backward rule and hand the gradients to its inputs."""
    hook = _backward_hook  # trace() / detect_anomaly() watch the backward rules through it
    if hook is not None:
        hook.begin_pass(create_graph=create_graph, retain_graph=retain_graph)
    take, get = grads.pop, grads.get
    # set_grad_enabled(create_graph) as a bare token: no context-manager object per call.
    mode = grad_mode._enabled.set(create_graph)
    try:
        for fn in order:
            ref = fn._output
            if ref is not None:  # one output, almost every op: _output_grads inlined
                y = ref()  # None if the output is gone: no gradient can have reached it
                entry = take(id(y), None)
                if entry is None:
                    gys = None
                else:  # (y, alive here, is what Function.output reads while the rule runs)
                    g = entry[1]
                    if y._hooks:
                        g = _run_hooks(y, g, hooked)
                    if targets and id(y) in targets:
                        result[id(y)] = (y, g)
                    gys = (g,)
            else:
                gys = _output_grads(fn, grads, targets, result, hooked)
            if gys is None:  # no gradient reached this node
                _release(fn, retain_graph)
                continue
            # Only nodes that saved values can be invalidated by an in-place change: one
            # tuple comparison in C (_check_versions finds what changed, and raises).
            saved = fn.input_versions
            if (
                saved is not None
                and tuple(map(_first, map(_counter_of, fn.inputs))) != saved  # versions()
            ) or fn.output_versions is not None:
                _check_versions(fn)
            if hook is not None:
                gxs = hook.run_rule(fn, gys)  # calls fn.backward(*gys), watching it
            else:
                gxs = fn.backward(*gys)
            if type(gxs) is not tuple:
                gxs = (gxs,)
            inputs = fn.inputs
            if len(gxs) != len(inputs):
                raise RuntimeError(
                    f"{fn.op_name()}.backward returned {len(gxs)} gradients "
                    f"for {len(inputs)} inputs"
                )
            for x, gx, need in zip(inputs, gxs, fn.needs_input_grad):
                if gx is None or not need:
                    continue
                # (._data: the slot behind the .data property, read without a call)
                xa, ga = x._data, gx._data
                # One test for the usual case (`is`: equal builtin dtypes are one object)
                if ga.dtype is not xa.dtype or ga.shape != xa.shape:
                    gx = _conformed(fn, x, gx)
                key = id(x)
                entry = get(key)  # _accumulate(grads, x, gx), inlined: hot path
                if entry is None:
                    grads[key] = (x, gx)
                elif create_graph:
                    grads[key] = (x, entry[1] + gx)
                else:  # grad mode is off, so no Add node would be recorded: add the arrays
                    grads[key] = (x, Tensor._wrap(entry[1]._data + gx._data))
            if ref is None:  # _release(fn, retain_graph), inlined
                fn._held_outputs = None
            if not retain_graph:
                _free(fn)
    finally:
        grad_mode._enabled.reset(mode)


def _conformed(fn, x, gx):
    """``gx`` cast to ``x``'s dtype (a float32 input used in a float64 op, say); a gradient
    of another shape than ``x`` is a bug in ``fn``'s backward rule, and raises."""
    x_dtype = x._data.dtype
    if gx._data.dtype != x_dtype:
        gx = gx.astype(x_dtype)
    if gx._data.shape != x._data.shape:
        raise RuntimeError(
            f"{fn.op_name()}.backward produced a gradient of shape {gx.shape} "
            f"for an input of shape {x.shape}"
        )
    return gx


def _output_grads(fn, grads, targets, result, hooked):
    """The gradients reaching the outputs of ``fn``, a node with several (the walk takes
    one-output nodes itself), taken out of ``grads``, as a tuple for its backward rule; None
    when none reached it. Hooks on the outputs run here, and a gradient asked for by
    ``grad`` is put in ``result``."""
    outputs = fn._held_outputs
    gys = []
    for y in outputs:
        entry = grads.pop(id(y), None) if y is not None else None
        g = None
        if entry is not None:
            g = _run_hooks(y, entry[1], hooked) if y._hooks else entry[1]
            if id(y) in targets:
                result[id(y)] = (y, g)
        gys.append(g)
    if all(g is None for g in gys):
        return None
    # A missing output gradient of a multi-output op is zero (the output itself may be
    # gone: nothing kept it alive).
    return tuple(
        [
            g if g is not None else Tensor._wrap(fn.xp.zeros(shape, dtype))
            for g, (shape, dtype) in zip(gys, fn.output_specs)
        ]
    )


def _accumulate(grads, x, g):
    entry = grads.get(id(x))
    grads[id(x)] = (x, g if entry is None else entry[1] + g)


def _run_hooks(x, g, hooked: set):
    """``g`` after ``x``'s hooks; the owners of the arrays they are handed go into ``hooked``
    (a gradient handed out later over that memory is copied, see _own_memory; an id reused
    after its array is freed costs one copy, never a shared buffer)."""
    if not x._hooks:
        return g
    retain = False
    for hook in list(x._hooks):
        if hook is RETAIN_GRAD:  # after the other hooks, whatever the order they came in
            retain = True
            continue
        hooked.add(id(_owner(g._data)))
        new = hook(g)
        if new is not None:
            new = new if isinstance(new, Tensor) else Tensor(new)
            if new.shape != g.shape:
                raise RuntimeError(
                    f"a hook on a tensor of shape {x.shape} returned a gradient of shape "
                    f"{new.shape}; expected {g.shape}"
                )
            g = new
    if retain:
        _retain(x, g)
    return g


def _retain(x, g):
    """``retain_grad()``: ``x.grad`` is ``g`` in memory of its own, or the sum with what an
    earlier call stored (a new tensor, as PyTorch's). Recorded when the walk records
    (``create_graph``), so the stored gradient is differentiable then."""
    recording = grad_mode.is_grad_enabled()
    x.grad = _copy(g, recording) if x.grad is None else x.grad + g


def _check_versions(fn):
    """Refuse to differentiate through inputs (or, for ops whose backward reads it, the
    output) that were changed in place after the forward."""
    # One tuple comparison in C first; the loop below finds which input changed.
    if fn.input_versions is not None and versions(fn.inputs) != fn.input_versions:
        for i, (x, v) in enumerate(zip(fn.inputs, fn.input_versions)):
            if x._version != v:
                _version_error(fn, "input", i, x, v)
    if fn.output_versions is not None:
        held = fn._held_outputs
        outputs = held if held is not None else [ref() for ref in fn.outputs]
        for i, (y, v) in enumerate(zip(outputs, fn.output_versions)):
            if y is not None and y._version != v:
                _version_error(fn, "output", i, y, v)


def _version_error(fn, what: str, i: int, x, v: int):
    name = f", named {x.name!r}" if x.name else ""
    saved = f"{fn.op_name()}: {what} {i} (shape {x.shape}, dtype {x.dtype}{name})"
    versions = f"version {v} -> {x._version}"
    if getattr(x._vc, "replaced_at", 0) > v:  # Tensor._replace_data
        raise RuntimeError(
            f"{saved} saved for backward: its .data was replaced (t.data = array) after it "
            f"was saved ({versions}). Recompute the forward after the assignment."
        )
    raise RuntimeError(
        f"{saved} saved for backward was modified in place after the forward ({versions}), "
        "e.g. by an optimizer step. Recompute the forward after the change."
    )


def _release(fn, retain_graph):
    fn._held_outputs = None
    if not retain_graph:
        _free(fn)


def _free(fn):
    """Drop the saved tensors (their arrays can now be freed); keep only where the edges
    led, so that a second backward can say what is wrong (Function.freed_edges: one flat
    tuple, not a pair per input, for the cyclic GC to count while the graph lives)."""
    inputs = fn.inputs
    fn._freed = tuple(map(weakref.ref, inputs)) + tuple(map(_grad_fn_of, inputs))
    fn.inputs = None


# Set by the instruments in tinymeta.autograd (trace, detect_anomaly) while one is
# active, None otherwise: watching costs nothing when nobody watches. It is an object
# with ``begin_pass(create_graph=, retain_graph=)`` and ``gxs = run_rule(fn, gys)``;
# see tinymeta/autograd/_hooks.py.
_backward_hook = None
