"""tinymeta: a from-scratch reverse-mode tensor autograd engine with meta-learning on top.

import tinymeta as tm
x = tm.tensor([1.0, 2.0], requires_grad=True)
(g,) = tm.grad((x ** 3).sum(), x, create_graph=True)   # 3 x**2, differentiable again
"""

import numpy as _np


def _register_kernels() -> None:
    """Make ``tinymeta.kernels`` importable from a source checkout that was not installed.

    The wheel (and ``pip install -e .``) maps the top-level ``kernels/`` folder to
    ``tinymeta.kernels`` (see pyproject.toml's package-dir). A plain checkout on ``sys.path``
    has no such mapping, so here the sibling folder of this package is loaded under that name,
    exactly as the installed mapping would. Where neither exists, say what to run.
    """
    import importlib.util
    import os
    import sys

    if "tinymeta.kernels" in sys.modules or importlib.util.find_spec("tinymeta.kernels"):
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        raise ImportError(
            "tinymeta.kernels is missing: tinymeta was imported from a source tree without its "
            "kernels/ folder mapped in; run `pip install -e .` in the repository root"
        )
    spec = importlib.util.spec_from_file_location(
        "tinymeta.kernels", init, submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["tinymeta.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["tinymeta.kernels"]
        raise
    globals()["kernels"] = module


_register_kernels()

from tinymeta import (  # noqa: E402
    autograd,
    cuda,
    cuda_graph,  # registers the CUDA-graph path of capture
    testing,
)
from tinymeta import ops as _ops
from tinymeta.autograd import backward, grad
from tinymeta.capture import CaptureError, capture
from tinymeta.creation import (
    arange,
    eye,
    from_numpy,
    full,
    manual_seed,
    ones,
    ones_like,
    rand,
    randn,
    tensor,
    zeros,
    zeros_like,
)
from tinymeta.grad_mode import enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from tinymeta.ops import (
    abs,
    broadcast_to,
    clip,
    concatenate,
    cos,
    einsum,
    exp,
    expand_dims,
    flatten,
    log,
    logsumexp,
    matmul,
    max,
    maximum,
    mean,
    min,
    minimum,
    relu,
    reshape,
    sigmoid,
    sin,
    sqrt,
    squeeze,
    stack,
    sum,
    sum_to,
    swapaxes,
    tanh,
    transpose,
    unsqueeze,
    var,
    where,
)
from tinymeta.ops import methods as _methods  # noqa: F401  (attaches Tensor operators)
from tinymeta.tensor import Tensor

float32 = _np.dtype(_np.float32)
float64 = _np.dtype(_np.float64)
int64 = _np.dtype(_np.int64)
bool_ = _np.dtype(_np.bool_)

__version__ = "0.1.0"

# Subpackages loaded on first use (``tm.nn``, ``tm.optim``, ...), so that
# ``import tinymeta`` stays fast and optional parts cost nothing until used.
_LAZY_MODULES = {"nn", "optim", "meta", "data", "viz", "kernels"}
_LAZY_ATTRIBUTES = {"save": "tinymeta.serialization", "load": "tinymeta.serialization"}


def __getattr__(name):
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module(f"tinymeta.{name}")
    if name in _LAZY_ATTRIBUTES:
        return getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
    raise AttributeError(f"module 'tinymeta' has no attribute {name!r}")
