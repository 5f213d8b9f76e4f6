"""Which step of an inner loop a forward pass belongs to.

MAML++ (Antoniou et al. 2019) keeps separate BatchNorm running statistics for
each inner step: the activations after two SGD steps are distributed
differently from those of the initial parameters, so one running average
mixes them up. A layer asks ``current_inner_step()``; the inner loop
(``tinymeta.meta.adapt``) says which step it is on with ``inner_step(k)``.
Outside any inner loop the answer is None.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

from tinymeta._checks import check_int

__all__ = ["current_inner_step", "inner_step"]

_STEP: ContextVar = ContextVar("tinymeta_inner_step", default=None)


@contextmanager
def inner_step(step: int):
    """Run the body as inner step ``step`` (0 = the forward on the initial parameters)."""
    step = check_int("step", step, "inner_step", low=0)
    token = _STEP.set(step)
    try:
        yield
    finally:
        _STEP.reset(token)


def current_inner_step() -> int | None:
    """The step set by the innermost ``inner_step`` block, or None outside one."""
    return _STEP.get()
