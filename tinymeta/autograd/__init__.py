"""``tm.autograd``: the backward pass (``grad``, ``backward``) and, later in
this package, instruments that let you watch it work."""

from tinymeta.autograd.engine import backward, grad

__all__ = ["backward", "grad"]
