"""Which step of an inner loop a forward pass belongs to.

MAML++ (Antoniou et al. 2019) keeps separate BatchNorm running statistics for
each inner step: the activations after two SGD steps are distributed
differently from those of the initial parameters, so one running average
mixes them up. A layer asks ``current_inner_step()``; the inner loop
(``tinymeta.meta.adapt``) says which step it is on with ``inner_step(k)``.
Outside any inner loop the answer is None.
"""

from __future__ import annotations

from contextvars import ContextVar

from tinymeta._checks import check_int

__all__ = ["current_inner_step", "inner_step"]

_STEP: ContextVar = ContextVar("tinymeta_inner_step", default=None)


class inner_step:  # noqa: N801 - used as a function: ``with inner_step(k):``
    """Run the body as inner step ``step`` (0 = the forward on the initial parameters).

    A class, not a generator context manager: MAML's inner loop enters one per task and
    step, and the generator machinery cost several times the variable's set and reset."""

    __slots__ = ("_step", "_token")

    def __init__(self, step: int):
        self._step = check_int("step", step, "inner_step", low=0)

    def __enter__(self) -> None:
        self._token = _STEP.set(self._step)

    def __exit__(self, *exc_info) -> None:
        _STEP.reset(self._token)


def current_inner_step() -> int | None:
    """The step set by the innermost ``inner_step`` block, or None outside one."""
    return _STEP.get()
