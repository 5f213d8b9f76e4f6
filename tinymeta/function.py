"""Function: one node of the graph.

A Function's ``forward`` receives arrays and returns arrays. Its ``backward``
receives the gradients of its outputs as *tensors* and returns the gradients of
its inputs built from tinymeta ops, so that the backward pass can itself be
recorded and differentiated (the engine decides, with grad mode).
"""

from __future__ import annotations

import itertools
import operator
import weakref

import numpy as np

from tinymeta import grad_mode
from tinymeta.backend import get_array_module
from tinymeta.tensor import Tensor, as_tensor_like, mark_graph_memory, share_version


class Function:
    """Base class of every differentiable op.

    Subclasses define ``forward(*arrays)`` and ``backward(*grad_outputs)``;
    op parameters (axis, shape, ...) go to ``__init__``. Call an op through
    ``Op.apply(*inputs, **params)``.

    Attributes set when the node is recorded:
      inputs            the input tensors (saved for backward)
      outputs           weak references to the output tensors (a strong
                        reference would make a cycle output -> node -> output)
      needs_input_grad  one bool per input: does it require grad?
      generation        max generation of the inputs; orders the backward pass
      seq               the recording order (tells a node from a younger creator
                        that an in-place op gave one of its inputs since)
    """

    # Does backward read the *values* of the inputs? Ops whose backward only
    # needs shapes (add, reshape, ...) set False: changing their inputs in
    # place after the forward does not invalidate the graph.
    saves_inputs = True
    # Does backward read the *value* of the output (exp, tanh, sqrt, ... reuse
    # ``self.output``)? Then changing the output in place invalidates the graph too.
    saves_output = False

    inputs = None
    # The weak reference to the output of a one-output node (almost every op), read by the
    # engine; those of a multi-output node. ``outputs`` gives either as a tuple: a node keeps
    # no one-element tuple for the cyclic garbage collector to count (see _FLAGS).
    _output = None
    _outputs = None
    xp = np  # the array module of the inputs; set per node only for CuPy ones
    input_versions = None  # set by _record when saves_inputs
    _held_outputs = None  # set by the engine for multi-output nodes while it runs backward
    output_versions = None  # set by _record when saves_output
    # A multi-output op whose ``output_specs`` ((shape, dtype) of each output) are a property
    # derived from its parameters sets False: _record then keeps no tuples of them per node.
    keeps_output_specs = True

    @classmethod
    def apply(cls, *inputs, **params):
        """Run the op on tensors (or values convertible to tensors)."""
        fn = cls(**params) if params else cls()
        # The hot path of every op: one or two host tensors, their arrays taken without a
        # loop (the general case, and conversions, in _arrays_of). ``._data`` is the slot
        # behind the ``data`` property, read without a call (ops do the same in hot paths).
        n = len(inputs)
        if n == 1:
            a = inputs[0]
            if isinstance(a, Tensor) and type(da := a._data) is np.ndarray:
                arrays, tensors = (da,), inputs
                need = a.requires_grad
                needs = _NEEDS_1.get(need) or (need,)
            else:
                arrays, tensors, needs, need = _arrays_of(fn, inputs)
        elif n == 2:
            a, b = inputs
            if (
                isinstance(a, Tensor)
                and isinstance(b, Tensor)
                and type(da := a._data) is np.ndarray
                and type(db := b._data) is np.ndarray
            ):
                arrays, tensors = (da, db), inputs
                needs = (a.requires_grad, b.requires_grad)
                needs = _FLAGS.get(needs, needs)
                need = needs[0] or needs[1]
            else:
                arrays, tensors, needs, need = _arrays_of(fn, inputs)
        elif n == 3:  # Linear with a bias, and the like
            a, b, c = inputs
            if (
                isinstance(a, Tensor)
                and isinstance(b, Tensor)
                and isinstance(c, Tensor)
                and type(da := a._data) is np.ndarray
                and type(db := b._data) is np.ndarray
                and type(dc := c._data) is np.ndarray
            ):
                arrays, tensors = (da, db, dc), inputs
                needs = (a.requires_grad, b.requires_grad, c.requires_grad)
                needs = _FLAGS.get(needs, needs)
                need = needs[0] or needs[1] or needs[2]
            else:
                arrays, tensors, needs, need = _arrays_of(fn, inputs)
        else:
            arrays, tensors, needs, need = _arrays_of(fn, inputs)
        try:
            if _capture_hook is None:
                ys = fn.forward(*arrays)
            else:  # tinymeta.capture is recording a step: it runs the forward itself
                ys = _capture_hook(fn, tensors, arrays)
        except (ValueError, IndexError, TypeError) as e:
            raise _named_error(cls, e, arrays) from e
        # _wrap turns NumPy scalars (0-d results) into 0-d arrays: a tensor holds arrays.
        if type(ys) is not tuple:
            y = Tensor._wrap(ys)
            if need and _grad_enabled():  # is_grad_enabled(), without a call
                fn._record_one(tensors, needs, y)
            if _forward_hook is not None:
                _forward_hook(fn, [y])
            return y
        if len(ys) == 2:  # (no list-comprehension frame for the usual pair)
            outputs = (Tensor._wrap(ys[0]), Tensor._wrap(ys[1]))
        else:
            outputs = tuple([Tensor._wrap(y) for y in ys])
        if need and _grad_enabled():
            fn._record(tensors, needs, outputs)
        if _forward_hook is not None:
            _forward_hook(fn, list(outputs))
        return outputs

    def _record_one(self, tensors, needs, y):
        """_record for one output and one to three inputs (almost every op), without loops."""
        n = len(tensors)
        if n > 3:
            return self._record(tensors, needs, (y,))
        self.inputs = tensors
        self.needs_input_grad = needs
        a = tensors[0]
        generation = a.generation
        if n == 1:
            if self.saves_inputs:
                seen = (a._vc[0],)
                self.input_versions = _ZERO_VERSIONS.get(seen, seen)
        else:
            b = tensors[1]
            if b.generation > generation:
                generation = b.generation
            if n == 2:
                if self.saves_inputs:
                    seen = (a._vc[0], b._vc[0])
                    self.input_versions = _ZERO_VERSIONS.get(seen, seen)
            else:  # Linear with a bias
                c = tensors[2]
                if c.generation > generation:
                    generation = c.generation
                if self.saves_inputs:
                    seen = (a._vc[0], b._vc[0], c._vc[0])
                    self.input_versions = _ZERO_VERSIONS.get(seen, seen)
        self.generation = generation
        self.seq = _next_seq()  # see _record
        if self.saves_output:
            seen = (y._vc[0],)
            self.output_versions = _ZERO_VERSIONS.get(seen, seen)
        y.grad_fn = self
        y.requires_grad = True
        y.generation = generation + 1
        self._output = weakref.ref(y)

    def _record(self, tensors, needs, outputs):
        self.inputs = tensors = tuple(tensors)
        needs = tuple(needs)
        self.needs_input_grad = _FLAGS.get(needs, needs)
        # map() with attrgetter instead of comprehensions: no Python frame per op
        self.generation = generation = max(map(_generation_of, tensors))
        # The recording order: an in-place op that gives a tensor a new creator (x[i] = v)
        # is younger than every node that used the tensor before (see engine._collect).
        self.seq = _next_seq()
        # Versions are checked in backward only for what backward reads (see saves_inputs).
        if self.saves_inputs:
            self.input_versions = _interned_versions(versions(tensors))
        if self.saves_output:
            self.output_versions = _interned_versions(versions(outputs))
        for o in outputs:
            o.grad_fn = self
            o.requires_grad = True
            o.generation = generation + 1
        self.outputs = map(weakref.ref, outputs)
        if len(outputs) > 1 and self.keeps_output_specs:
            # An output may be garbage before backward runs; its zero gradient is then built
            # from the shape and dtype kept here.
            self.output_specs = tuple(zip(map(_shape_of, outputs), map(_dtype_of, outputs)))

    # --- what subclasses write -------------------------------------------
    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, *gys):
        raise NotImplementedError(f"{self.op_name()} has no backward rule")

    _freed = None  # set by the engine's _free: weak references to the inputs, then creators

    @property
    def freed_edges(self):
        """(weak reference to the input, its creator) for each input of a node that a backward
        pass freed (``inputs`` is None then); None while the node keeps its inputs."""
        freed = self._freed
        if freed is None:
            return None
        n = len(freed) // 2
        return tuple(zip(freed[:n], freed[n:]))

    @property
    def freed_creators(self) -> tuple:
        """The creators of the inputs of a freed node (see freed_edges)."""
        freed = self._freed
        return freed[len(freed) // 2 :]

    @property
    def outputs(self):
        """Weak references to the output tensors, a tuple (None before recording)."""
        ref = self._output
        return (ref,) if ref is not None else self._outputs

    @outputs.setter
    def outputs(self, refs):
        refs = tuple(refs)
        if len(refs) == 1:
            self._output, self._outputs = refs[0], None
        else:
            self._output, self._outputs = None, refs

    # --- helpers for backward rules ---------------------------------------
    @property
    def output(self):
        """The (first) output tensor, alive while the engine runs this node's backward rule
        (the engine holds the outputs of a multi-output node in ``_held_outputs``; a
        one-output node's output is held by the engine's walk itself)."""
        held = self._held_outputs
        if held is not None:
            return held[0]
        ref = self._output
        return (ref if ref is not None else self._outputs[0])()

    @classmethod
    def op_name(cls) -> str:
        return cls.__name__

    def __repr__(self):
        return f"<{self.op_name()}>"


class ViewFunction(Function):
    """An op whose output may be a view of its input's memory (reshape, transpose, basic
    indexing, broadcast_to, ...). When it is, the output shares the input's version counter,
    so that an in-place change through either is seen by graphs that saved the other. A
    copy (reshape of non-contiguous data, say) keeps a counter of its own."""

    @classmethod
    def apply(cls, *inputs, **params):
        y = _apply(cls, *inputs, **params)
        owner = y._data.base  # NumPy and CuPy collapse chains of views: the owning array
        if owner is not None:  # a view (of an input's memory, or of a temporary)
            for x in inputs:
                if isinstance(x, Tensor):
                    a = x._data
                    if owner is (a if a.base is None else a.base):
                        share_version(x, y, view=True)
                        if y.grad_fn is None and x.grad_fn is not None:
                            mark_graph_memory(x._vc, x)  # a view outside the graph (no_grad)
                        break
        return y


_apply = Function.apply.__func__  # (super() in a classmethod costs a lookup per call)


def _arrays_of(fn, inputs) -> tuple:
    """(arrays, tensors, needs, any need) of any number of inputs: numbers and arrays become
    tensors (as_tensor_like), and ``fn.xp`` is set for CuPy ones."""
    arrays = []
    for t in inputs:
        if not isinstance(t, Tensor) or type(a := t._data) is not np.ndarray:
            break
        arrays.append(a)
    else:  # all host tensors (three-input ops: Linear with a bias, say)
        needs = tuple([t.requires_grad for t in inputs])
        return arrays, inputs, needs, True in needs
    tensors = tuple(as_tensor_like(inputs, type(fn).__name__))
    arrays = [t._data for t in tensors]
    needs = tuple([t.requires_grad for t in tensors])
    if arrays and type(arrays[0]) is not np.ndarray:
        fn.xp = get_array_module(arrays[0])
    return arrays, tensors, needs, True in needs


def _named_error(cls, error: Exception, arrays) -> Exception:
    """``error`` again, its message prefixed by the op and followed by the input shapes."""
    shapes = ", ".join(f"{tuple(a.shape)} {a.dtype}" for a in arrays)
    message = f"{cls.op_name()}: {error} (inputs: {shapes})"
    try:
        return type(error)(message)
    except TypeError:  # a class that wants other arguments (NumPy's ufunc errors)
        base = next(t for t in (ValueError, IndexError, TypeError) if isinstance(error, t))
        return base(message)


_generation_of = operator.attrgetter("generation")
_shape_of = operator.attrgetter("_data.shape")  # of a tensor's array, without the property
_dtype_of = operator.attrgetter("_data.dtype")
_next_seq = itertools.count(1).__next__


def versions(tensors) -> tuple:
    """The version of each tensor's memory."""
    # map() instead of a comprehension: no Python frame (the engine checks every saved node)
    return tuple(map(_first, map(_counter_of, tensors)))


_counter_of = operator.attrgetter("_vc")
_first = operator.itemgetter(0)


# Every recorded node keeps a tuple of flags (needs_input_grad) and, when it saves its inputs,
# one of versions: almost always one of these few. Sharing them spares a tuple per node that
# the cyclic garbage collector would count (its collections run about once per 700 tracked
# objects allocated and kept, and a graph keeps all of its nodes' tuples until backward).
# (Two tables: (0,) == (False,), and a version must stay an int in error messages.)
_FLAGS = {t: t for n in (1, 2, 3) for t in itertools.product((False, True), repeat=n)}
_NEEDS_1 = {False: (False,), True: (True,)}
_ZERO_VERSIONS = {(0,) * n: (0,) * n for n in (1, 2, 3)}


def _interned_versions(seen: tuple) -> tuple:
    """The shared tuple equal to ``seen`` (versions of fresh tensors: zeros), else ``seen``."""
    return _ZERO_VERSIONS.get(seen, seen)


def arrays_only() -> bool:
    """Whether an op applied now would record nothing that anyone sees: grad mode is off (a
    backward pass without create_graph) and neither tm.capture nor detect_anomaly watches
    the ops. A backward rule may then form its gradient from the arrays directly, with the
    same array calls its ops' forwards make, skipping Function.apply."""
    return not _grad_enabled() and _capture_hook is None and _forward_hook is None


def arrays_only_on_host(*tensors) -> bool:
    """arrays_only(), and the tensors hold NumPy arrays: a backward rule may then call its
    ops' array functions itself (CuPy arrays take Function.apply, which sets ``xp``)."""
    for t in tensors:
        if type(t._data) is not np.ndarray:
            return False
    return not _grad_enabled() and _capture_hook is None and _forward_hook is None


# grad mode's switch, read once per op (grad_mode.is_grad_enabled without the extra call)
_grad_enabled = grad_mode._enabled.get

# Set once an in-place op has given a tensor a new creator (ops.shape.setitem): from then
# on the engine checks that no node uses a tensor whose creator is younger than itself.
inplace_recorded = False

# Set by tinymeta.capture while it records a step, None otherwise: called as
# ``_capture_hook(fn, input_tensors, input_arrays)`` in place of ``fn.forward(*input_arrays)``.
_capture_hook = None

# Set by tinymeta.autograd.detect_anomaly() while it is active, None otherwise:
# called as ``_forward_hook(fn, outputs)`` after every op's forward (recorded or not).
_forward_hook = None
