"""Gradient checking: ``gradcheck``, ``gradgradcheck``, ``check_grads`` and
Hypothesis ``strategies`` for property tests of your own code."""

from tinymeta.testing.gradcheck import check_grads, gradcheck, gradgradcheck

__all__ = ["check_grads", "gradcheck", "gradgradcheck", "strategies"]


def __getattr__(name):
    # Imported on first use: Hypothesis is a test dependency, not a library one.
    if name == "strategies":
        import importlib

        return importlib.import_module("tinymeta.testing.strategies")
    raise AttributeError(name)
