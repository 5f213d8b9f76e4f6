"""Gradient checking: ``gradcheck``, ``gradgradcheck``, ``check_grads``; meta-gradient
checking: ``check_meta_grads``, ``assert_meta_grads_close``,
``check_task_independence`` (with
``first_order_inner_grads``, the mode they use to tell a silently first-order
meta-gradient); and Hypothesis ``strategies`` for property tests of your own code."""

from tinymeta.autograd.first_order import first_order_inner_grads
from tinymeta.testing.gradcheck import check_grads, gradcheck, gradgradcheck
from tinymeta.testing.meta_check import (
    MetaGradCheck,
    ParamCheck,
    TaskIndependenceCheck,
    assert_meta_grads_close,
    check_meta_grads,
    check_task_independence,
)

__all__ = [
    "MetaGradCheck",
    "ParamCheck",
    "TaskIndependenceCheck",
    "assert_meta_grads_close",
    "check_grads",
    "check_meta_grads",
    "check_task_independence",
    "first_order_inner_grads",
    "gradcheck",
    "gradgradcheck",
    "strategies",
]


def __getattr__(name):
    # Imported on first use: Hypothesis is a test dependency, not a library one.
    if name == "strategies":
        import importlib

        return importlib.import_module("tinymeta.testing.strategies")
    raise AttributeError(name)
