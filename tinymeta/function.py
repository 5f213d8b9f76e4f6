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
    outputs = None
    xp = np  # the array module of the inputs; set per node only for CuPy ones
    input_versions = None  # set by _record when saves_inputs
    output_versions = None  # set by _record when saves_output

    @classmethod
    def apply(cls, *inputs, **params):
        """Run the op on tensors (or values convertible to tensors)."""
        fn = cls(**params) if params else cls()
        # The hot path of every op: all inputs are already host tensors, so their
        # arrays are taken in the same pass (as_tensor_like handles the rest).
        arrays, needs = [], []
        for t in inputs:
            if not isinstance(t, Tensor) or type(t.data) is not np.ndarray:
                break
            arrays.append(t.data)
            needs.append(t.requires_grad)
        else:
            tensors = inputs  # host arrays: fn.xp stays the class default, NumPy
        if len(arrays) != len(inputs):
            tensors = as_tensor_like(inputs, cls.__name__)
            arrays = [t.data for t in tensors]
            needs = [t.requires_grad for t in tensors]
            if type(arrays[0]) is not np.ndarray:
                fn.xp = get_array_module(arrays[0])
        try:
            if _capture_hook is None:
                ys = fn.forward(*arrays)
            else:  # tinymeta.capture is recording a step: it runs the forward itself
                ys = _capture_hook(fn, tensors, arrays)
        except (ValueError, IndexError, TypeError) as e:
            raise _named_error(cls, e, arrays) from e
        # _wrap turns NumPy scalars (0-d results) into 0-d arrays: a tensor holds arrays.
        single = type(ys) is not tuple
        outputs = (Tensor._wrap(ys),) if single else tuple([Tensor._wrap(y) for y in ys])

        if True in needs and _grad_enabled():  # is_grad_enabled(), without a call
            fn._record(tensors, tuple(needs), outputs)
        if _forward_hook is not None:
            _forward_hook(fn, list(outputs))
        return outputs[0] if single else outputs

    def _record(self, tensors, needs, outputs):
        self.inputs = tensors = tuple(tensors)
        self.needs_input_grad = needs
        # map() with attrgetter instead of comprehensions: no Python frame per op
        self.generation = generation = max(map(_generation_of, tensors))
        # The recording order: an in-place op that gives a tensor a new creator (x[i] = v)
        # is younger than every node that used the tensor before (see engine._collect).
        self.seq = _next_seq()
        # Versions are checked in backward only for what backward reads (see saves_inputs).
        if self.saves_inputs:
            self.input_versions = versions(tensors)
        if self.saves_output:
            self.output_versions = versions(outputs)
        for o in outputs:
            o.grad_fn = self
            o.requires_grad = True
            o.generation = generation + 1
        self.outputs = tuple(map(weakref.ref, outputs))
        if len(outputs) > 1:
            # An output may be garbage before backward runs; its zero gradient is then built
            # from the shape and dtype kept here.
            self.output_specs = tuple([(o.shape, o.dtype) for o in outputs])

    # --- what subclasses write -------------------------------------------
    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, *gys):
        raise NotImplementedError(f"{self.op_name()} has no backward rule")

    # --- helpers for backward rules ---------------------------------------
    @property
    def output(self):
        """The (single) output tensor, alive while the engine runs backward."""
        return self._held_outputs[0]

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
        owner = y.data.base  # NumPy and CuPy collapse chains of views: the owning array
        if owner is not None:  # a view (of an input's memory, or of a temporary)
            for x in inputs:
                if isinstance(x, Tensor):
                    a = x.data
                    if owner is (a if a.base is None else a.base):
                        share_version(x, y, view=True)
                        if y.grad_fn is None and x.grad_fn is not None:
                            mark_graph_memory(x._vc)  # a view outside the graph (no_grad)
                        break
        return y


_apply = Function.apply.__func__  # (super() in a classmethod costs a lookup per call)


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
_next_seq = itertools.count(1).__next__


def versions(tensors) -> tuple:
    """The version of each tensor's memory."""
    return tuple([t._vc[0] for t in tensors])


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
