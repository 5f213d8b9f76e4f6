"""The switch that decides whether ops record a graph.

Backward rules are written with ordinary tinymeta ops; the engine runs them
with grad mode set to ``create_graph``. That single switch is what makes
gradients of gradients (of any order) work.
"""

from __future__ import annotations

import contextvars
import functools

_enabled = contextvars.ContextVar("tinymeta_grad_enabled", default=True)


def is_grad_enabled() -> bool:
    """Whether new ops are recorded for differentiation."""
    return _enabled.get()


class _GradMode:
    """Context manager and decorator that sets grad mode, restoring it on exit."""

    mode = True

    def __enter__(self):
        # A stack, so one instance can be entered again while it is active.
        self.__dict__.setdefault("_tokens", []).append(_enabled.set(self.mode))
        return self

    def __exit__(self, *exc):
        _enabled.reset(self._tokens.pop())
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with type(self)():
                return fn(*args, **kwargs)

        return wrapper


class _NoArgGradMode(_GradMode):
    """As in PyTorch, ``@tm.no_grad`` works without parentheses too."""

    def __new__(cls, fn=None):
        self = super().__new__(cls)
        return self if fn is None else self(fn)


class no_grad(_NoArgGradMode):
    """Record nothing inside: ``with tm.no_grad(): ...``, ``@tm.no_grad()`` or ``@tm.no_grad``."""

    mode = False


class enable_grad(_NoArgGradMode):
    """Record again inside a ``no_grad`` region (also a decorator, with or without ``()``)."""

    mode = True


class set_grad_enabled(_GradMode):
    """Set grad mode to ``mode`` inside the block."""

    def __init__(self, mode: bool):
        self.mode = bool(mode)

    def __call__(self, fn):
        mode = self.mode

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with set_grad_enabled(mode):
                return fn(*args, **kwargs)

        return wrapper
