"""Function: one node of the graph.

A Function's ``forward`` receives arrays and returns arrays. Its ``backward``
receives the gradients of its outputs as *tensors* and returns the gradients of
its inputs built from tinymeta ops, so that the backward pass can itself be
recorded and differentiated (the engine decides, with grad mode).
"""

from __future__ import annotations

import weakref

import numpy as np

from tinymeta import grad_mode
from tinymeta.backend import get_array_module
from tinymeta.tensor import Tensor, as_tensor_like


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
    xp = None

    @classmethod
    def apply(cls, *inputs, **params):
        """Run the op on tensors (or values convertible to tensors)."""
        fn = cls(**params)
        tensors = as_tensor_like(inputs, cls.__name__)
        arrays = [t.data for t in tensors]
        if arrays:
            first = arrays[0]
            fn.xp = np if type(first) is np.ndarray else get_array_module(first)
        try:
            ys = fn.forward(*arrays)
        except (ValueError, IndexError, TypeError) as e:
            raise _named_error(cls, e, arrays) from e
        single = not isinstance(ys, tuple)
        # NumPy turns 0-d results into scalars (np.float64); a tensor holds arrays.
        outputs = [
            Tensor._wrap(np.asarray(y) if isinstance(y, np.generic) else y)
            for y in ((ys,) if single else ys)
        ]

        if grad_mode.is_grad_enabled():
            needs = tuple(t.requires_grad for t in tensors)
            if any(needs):
                fn._record(tensors, needs, outputs)
        if _forward_hook is not None:
            _forward_hook(fn, outputs)
        return outputs[0] if single else tuple(outputs)

    def _record(self, tensors, needs, outputs):
        self.inputs = tuple(tensors)
        self.needs_input_grad = needs
        self.generation = max(t.generation for t in tensors)
        self.input_versions = tuple(t._version for t in tensors) if self.saves_inputs else None
        self.output_versions = tuple(o._version for o in outputs) if self.saves_output else None
        self.outputs = tuple(weakref.ref(o) for o in outputs)
        for o in outputs:
            o.grad_fn = self
            o.requires_grad = True
            o.generation = self.generation + 1

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


def _named_error(cls, error: Exception, arrays) -> Exception:
    """``error`` again, its message prefixed by the op and followed by the input shapes."""
    shapes = ", ".join(f"{tuple(a.shape)} {a.dtype}" for a in arrays)
    message = f"{cls.op_name()}: {error} (inputs: {shapes})"
    try:
        return type(error)(message)
    except TypeError:  # a class that wants other arguments (NumPy's ufunc errors)
        base = next(t for t in (ValueError, IndexError, TypeError) if isinstance(error, t))
        return base(message)


# Set by tinymeta.autograd.detect_anomaly() while it is active, None otherwise:
# called as ``_forward_hook(fn, outputs)`` after every op's forward (recorded or not).
_forward_hook = None
