"""A mode in which every gradient is taken first order.

Inside ``with first_order_inner_grads():``, ``grad(..., create_graph=True)``
and ``backward(create_graph=True)`` behave as if ``create_graph`` were False:
the gradients they return are constants, with no graph behind them. Run a
meta-learning loss under it and its meta-gradient is the first-order
approximation (FOMAML's), whatever the code asked for. The graph is still kept
as ``create_graph=True`` would keep it (``retain_graph`` defaults to True), so
code that goes through it again keeps working.

``tm.testing.check_meta_grads`` uses it to tell a meta-gradient that is
silently first order (a forgotten ``create_graph=True``) from one that is wrong
in some other way.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["first_order_inner_grads", "is_first_order"]

_FIRST_ORDER: ContextVar = ContextVar("tinymeta_first_order_inner_grads", default=False)


@contextmanager
def first_order_inner_grads():
    """Treat every gradient taken in the body as a constant (``create_graph`` is ignored)."""
    token = _FIRST_ORDER.set(True)
    try:
        yield
    finally:
        _FIRST_ORDER.reset(token)


def is_first_order() -> bool:
    """Whether ``first_order_inner_grads()`` is active."""
    return _FIRST_ORDER.get()
