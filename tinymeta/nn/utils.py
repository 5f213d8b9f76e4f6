"""``functional_call`` (run a module with other tensors) and ``clip_grad_norm_``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import numpy as np

from tinymeta._checks import check_nonnegative, check_positive
from tinymeta.backend import get_array_module
from tinymeta.grad_mode import no_grad
from tinymeta.nn.module import _OVERRIDES, Module
from tinymeta.tensor import Tensor

__all__ = ["clip_grad_norm_", "functional_call"]


def _replaceable(module: Module) -> dict:
    """name -> the module's own tensor, for every parameter and buffer (tied ones under each
    of their names)."""
    out = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for registry in (m._parameters, m._buffers):
            for name, t in registry.items():
                if t is not None:
                    out[dot + name] = t
    return out


def functional_call(module: Module, params: Mapping, *args, **kwargs):
    """``module(*args, **kwargs)`` with ``params[name]`` standing in for the module's tensor
    of that name.

    ``params`` is keyed like ``named_parameters()`` (buffer names such as
    ``"0.running_mean"`` work too); a partial dict is fine, the other tensors
    are the module's own. The module is never modified: its attributes
    resolve to the replacements through a context variable while the call
    runs (see ``tinymeta.nn.module``), so an exception leaves nothing to
    restore, and calls nest. This is what MAML's inner loop differentiates
    through: gradients flow to the tensors in ``params``.

    Buffers that are not replaced are the module's own, so a BatchNorm in
    training mode updates its running statistics in place, as it would in a
    plain call (PyTorch does the same); pass the buffers in ``params`` to
    redirect those updates. A forward must read parameters as attributes
    (``self.weight``); ``self.parameters()`` inside forward lists the module's
    own tensors.

    A replacement has the shape of the tensor it replaces, or that shape
    with leading batch axes: per-task parameters for task-vectorized MAML
    (``tinymeta.meta.per_task``), which Linear, Conv2d (batched GEMMs) and
    BatchNorm2d (statistics per task) apply task by task to an input with the
    same leading task axis, e.g. images (T, N, C, H, W); MaxPool2d and ReLU
    take that input as it is. A Flatten in such a net should count from the
    end (``nn.Flatten(-3)`` for images) so that it leaves the task axis alone.

    Raises KeyError for a name the module does not have (listing the valid
    ones) and ValueError for a replacement of the wrong shape.
    """
    if not isinstance(module, Module):
        raise TypeError(f"functional_call: expected an nn.Module, got {type(module).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(
            f"functional_call: params must be a dict of name -> tensor, got {type(params).__name__}"
        )
    own = _replaceable(module)
    table = {}
    for name, value in params.items():
        original = own.get(name)
        if original is None:
            raise KeyError(
                f"functional_call: {name!r} is not a parameter or buffer of "
                f"{type(module).__name__}; valid names: {', '.join(own) or '(none)'}"
            )
        if not isinstance(value, Tensor):
            if isinstance(value, np.ndarray) or hasattr(value, "__cuda_array_interface__"):
                value = Tensor(value)  # a NumPy or CuPy array
            else:
                raise TypeError(
                    f"functional_call: params[{name!r}] is a {type(value).__name__}, "
                    "expected a Tensor"
                )
        trailing = (
            value.shape[value.ndim - original.ndim :] if value.ndim >= original.ndim else None
        )
        if trailing != original.shape:
            raise ValueError(
                f"functional_call: params[{name!r}] has shape {value.shape}, but the module's "
                f"tensor has shape {original.shape}"
            )
        previous = table.get(id(original))
        if previous is not None and previous is not value:
            raise ValueError(
                f"functional_call: {name!r} is tied to another name given a different tensor"
            )
        table[id(original)] = value
    outer = _OVERRIDES.get()
    if outer:  # nested call: the inner replacements win
        table = {**outer, **table}
    token = _OVERRIDES.set(table)
    try:
        return module(*args, **kwargs)
    finally:
        _OVERRIDES.reset(token)


def clip_grad_norm_(
    parameters,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """g <- g * min(1, max_norm / (total_norm + 1e-6)) for every gradient, in place.

    total_norm is the ``norm_type``-norm of all gradients together (as if
    concatenated; ``float("inf")`` for the max-norm). Returns it as a 0-d
    tensor. Parameters without a gradient are skipped. As in PyTorch, every
    gradient is multiplied (by at most 1) under ``no_grad`` with ``Tensor.mul_``,
    which bumps its version counter.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    elif not isinstance(parameters, Iterable):
        raise TypeError(
            f"clip_grad_norm_: expected tensors or an iterable of tensors, got {type(parameters)}"
        )
    # inf is allowed for both: max_norm=inf only measures the norm, norm_type=inf is the max-norm
    if not (_is_real(max_norm) and max_norm == math.inf):
        max_norm = check_nonnegative("max_norm", max_norm, "clip_grad_norm_")
    if not (_is_real(norm_type) and norm_type == math.inf):
        norm_type = check_positive("norm_type", norm_type, "clip_grad_norm_")
    grads = [p.grad for p in parameters if p.grad is not None]
    for g in grads:
        if g.grad_fn is not None:
            # Scaled in place under no_grad, a differentiable gradient would keep its
            # creator: a second-order gradient through it would silently ignore the scaling.
            raise RuntimeError(
                f"clip_grad_norm_: a gradient (shape {g.shape}) is part of a graph "
                f"(grad_fn={g.grad_fn.op_name()}, from backward(create_graph=True)); clipping "
                "it in place would make gradients through it silently wrong. Clip a "
                "gradient without a graph, or scale it with differentiable ops"
            )
    norm_type = float(norm_type)
    if not grads:
        return Tensor(np.zeros((), dtype=np.float32))
    xp = get_array_module(grads[0].data)
    # The norm of the per-tensor norms equals the norm of everything concatenated.
    norms = xp.stack([xp.linalg.norm(g.data.reshape(-1), ord=norm_type) for g in grads])
    total = xp.linalg.norm(norms, ord=norm_type)
    if error_if_nonfinite and not math.isfinite(float(total)):
        raise RuntimeError(
            f"clip_grad_norm_: the total {norm_type}-norm of the gradients is {float(total)}; "
            "pass error_if_nonfinite=False to clip anyway"
        )
    coef = min(max_norm / (float(total) + 1e-6), 1.0)
    with no_grad():
        for g in grads:
            g.mul_(coef)
    return Tensor(xp.asarray(total))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
