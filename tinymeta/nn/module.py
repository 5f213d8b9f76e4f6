"""Module and Parameter, with PyTorch's semantics.

A Module registers what is assigned to its attributes: a ``Parameter`` goes
to ``_parameters``, a Module to ``_modules``, and ``register_buffer`` puts
non-learnable state (BatchNorm's running statistics) in ``_buffers``. Those
attributes are read back through ``__getattr__``.

That lookup is also how ``functional_call`` works without ever touching the
module: it sets a context variable holding replacement tensors keyed by the
identity of the tensors they replace, and ``__getattr__`` returns the
replacement while the call runs. Nothing is swapped, so nothing needs
restoring, an exception cannot leave a module half-modified, and tied
parameters (one tensor under two names) stay tied.
"""

from __future__ import annotations

import contextvars
from collections import namedtuple
from collections.abc import Iterator

import numpy as np

from tinymeta import backend
from tinymeta._checks import check_bool
from tinymeta.grad_mode import no_grad
from tinymeta.tensor import DEFAULT_FLOAT, Tensor, clear_grad

# id(original tensor) -> replacement tensor, set by functional_call while it runs.
_OVERRIDES: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "tinymeta_nn_overrides", default=None
)


class Parameter(Tensor):
    """A tensor that a Module registers as learnable: ``requires_grad=True`` by default.

    ``Parameter(t)`` shares memory with the tensor or array ``t``. Ops on a
    Parameter return plain Tensors.
    """

    __slots__ = ()

    def __init__(self, data=None, requires_grad: bool = True):
        if data is None:
            data = np.empty(0, dtype=DEFAULT_FLOAT)
        elif isinstance(data, Tensor):
            data = data.data
        elif not hasattr(data, "dtype") or isinstance(data, np.generic):
            data = np.asarray(data)
            if data.dtype.kind == "f":
                data = data.astype(DEFAULT_FLOAT)  # lists and Python floats: float32
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def _check_name(name, what: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a str, got {type(name).__name__}")
    if not name or "." in name:
        raise KeyError(f"{what} name must be non-empty and contain no '.', got {name!r}")


class Module:
    """Base class of layers and models: subclass it, assign layers and Parameters
    as attributes in ``__init__`` (after ``super().__init__()``), write ``forward``.

    Calling the module calls ``forward``. Parameters are read as attributes
    (``self.weight``) in ``forward``: that is what lets ``functional_call`` run
    the module with other tensors.
    """

    training: bool

    def __init__(self) -> None:
        d = self.__dict__
        d["_parameters"] = {}
        d["_buffers"] = {}
        d["_non_persistent"] = set()
        d["_modules"] = {}
        d["training"] = True

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # --- registration -------------------------------------------------------------------
    def _registries(self) -> tuple:
        d = self.__dict__
        if "_parameters" not in d:
            raise AttributeError(
                f"{type(self).__name__}: call super().__init__() before assigning attributes"
            )
        return d["_parameters"], d["_buffers"], d["_modules"]

    def _forget(self, name: str) -> None:
        for registry in self._registries():
            registry.pop(name, None)
        self.__dict__["_non_persistent"].discard(name)
        self.__dict__.pop(name, None)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Add a parameter (or a None placeholder, like a missing bias) under ``name``."""
        self._registries()
        _check_name(name, "parameter")
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(
                f"{type(self).__name__}.register_parameter({name!r}): expected an nn.Parameter "
                f"or None, got {type(param).__name__}"
            )
        self._forget(name)
        self._parameters[name] = param

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        """Add non-learnable state; persistent buffers are part of ``state_dict()``."""
        self._registries()
        _check_name(name, "buffer")
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(
                f"{type(self).__name__}.register_buffer({name!r}): expected a Tensor or None, "
                f"got {type(tensor).__name__}"
            )
        self._forget(name)
        self._buffers[name] = tensor
        if not persistent:
            self._non_persistent.add(name)

    def add_module(self, name: str, module: Module | None) -> None:
        self._registries()
        _check_name(name, "module")
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module({name!r}): expected a Module, got {type(module).__name__}")
        self._forget(name)
        self._modules[name] = module

    register_module = add_module

    def __setattr__(self, name: str, value) -> None:
        params, buffers, modules = self._registries()
        if isinstance(value, Parameter):
            self._forget(name)
            params[name] = value
        elif isinstance(value, Module):
            self._forget(name)
            modules[name] = value
        elif name in params:
            if value is not None:
                raise TypeError(
                    f"cannot assign a {type(value).__name__} to parameter {name!r} of "
                    f"{type(self).__name__}: expected an nn.Parameter or None (to run the "
                    "module with other tensors, use nn.functional_call)"
                )
            params[name] = None
        elif name in buffers:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(
                    f"cannot assign a {type(value).__name__} to buffer {name!r} of "
                    f"{type(self).__name__}: expected a Tensor or None"
                )
            buffers[name] = value
        elif name in modules:
            if value is not None:
                raise TypeError(
                    f"cannot assign a {type(value).__name__} to submodule {name!r} of "
                    f"{type(self).__name__}: expected a Module or None"
                )
            modules[name] = None
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str):
        # Only called when ordinary lookup fails: registered tensors and submodules.
        d = self.__dict__
        if "_parameters" in d:
            for registry in (d["_parameters"], d["_buffers"]):
                if name in registry:
                    t = registry[name]
                    overrides = _OVERRIDES.get()
                    if overrides is not None and t is not None:
                        return overrides.get(id(t), t)
                    return t
            if name in d["_modules"]:
                return d["_modules"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        params, buffers, modules = self._registries()
        if name in params or name in buffers or name in modules:
            self._forget(name)
        else:
            object.__delattr__(self, name)

    def __dir__(self):
        params, buffers, modules = self._registries()
        return sorted(set(super().__dir__()) | set(params) | set(buffers) | set(modules))

    # --- traversal ----------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, m in self._modules.items():
            if m is not None:
                yield name, m

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "", remove_duplicate: bool = True, _memo=None):
        """(dotted name, module) for this module ("") and every submodule, depth first."""
        memo = set() if _memo is None else _memo
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        yield prefix, self
        for name, m in self.named_children():
            yield from m.named_modules(
                f"{prefix}.{name}" if prefix else name, remove_duplicate, memo
            )

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def _named_members(self, registry: str, prefix: str, recurse: bool, remove_duplicate: bool):
        seen = set()
        modules = self.named_modules(prefix, remove_duplicate) if recurse else [(prefix, self)]
        for mod_prefix, m in modules:
            for name, t in m.__dict__[registry].items():
                if t is None:
                    continue
                if remove_duplicate:
                    if id(t) in seen:
                        continue
                    seen.add(id(t))
                yield (f"{mod_prefix}.{name}" if mod_prefix else name), t

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter): this module's own first, then each submodule's, in
        registration order. A parameter shared by two modules is listed once."""
        return self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        return self._named_members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def apply(self, fn) -> Module:
        """Call ``fn(module)`` on every submodule (children first) and on this module."""
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    # --- state ----------------------------------------------------------------------------
    def _state_tensors(self) -> dict:
        """Every entry of state_dict(), name -> the module's own tensor (tied ones repeated)."""
        out = {}
        for prefix, m in self.named_modules(remove_duplicate=False):
            dot = f"{prefix}." if prefix else ""
            for name, p in m._parameters.items():
                if p is not None:
                    out[dot + name] = p
            for name, b in m._buffers.items():
                if b is not None and name not in m._non_persistent:
                    out[dot + name] = b
        return out

    def state_dict(self, keep_vars: bool = False) -> dict:
        """Parameters and persistent buffers by dotted name, as Tensors: a snapshot.

        The values are copies (detached tensors owning their arrays), so a saved
        dict does not change as training goes on; PyTorch returns references
        here, tinymeta returns a snapshot, as ``tinymeta.optim`` does.
        ``keep_vars=True`` returns the module's own tensors instead (no copy).
        The order is PyTorch's: a module's parameters, then its buffers, then
        each submodule's entries.
        """
        tensors = self._state_tensors()
        if keep_vars:
            return tensors
        return {k: Tensor._wrap(t.data.copy()) for k, t in tensors.items()}

    def load_state_dict(self, state_dict, strict: bool = True) -> IncompatibleKeys:
        """Copy values (tensors or arrays) into this module's tensors, in place.

        Identity is kept: the Parameters an optimizer holds see the new values.
        With ``strict`` every key must match; a shape mismatch always raises.
        Everything is checked before anything is copied, so a failed load
        changes nothing. Returns ``(missing_keys, unexpected_keys)``.
        """
        if not hasattr(state_dict, "items"):
            raise TypeError(
                "load_state_dict: expected a dict of name -> tensor, got "
                f"{type(state_dict).__name__}"
            )
        own = self._state_tensors()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        values, mismatched = {}, []
        for k, t in own.items():
            if k not in state_dict:
                continue
            v = state_dict[k]
            array = v.data if isinstance(v, Tensor) else v
            if not hasattr(array, "shape") or isinstance(array, np.generic):
                array = np.asarray(array)
            if array.dtype.kind not in "biufc":
                raise TypeError(
                    f"load_state_dict: {k!r} holds a {type(v).__name__} of dtype {array.dtype}, "
                    "expected numbers"
                )
            if tuple(array.shape) != t.shape:
                mismatched.append(f"{k}: checkpoint {tuple(array.shape)} vs model {t.shape}")
            values[k] = array
        errors = []
        if strict and missing:
            errors.append("missing key(s): " + ", ".join(missing))
        if strict and unexpected:
            errors.append("unexpected key(s): " + ", ".join(unexpected))
        if mismatched:
            errors.append("shape mismatch: " + "; ".join(mismatched))
        if errors:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: " + "; ".join(errors)
            )
        with no_grad():
            for k, array in values.items():
                t = own[k]
                t.copy_(backend.move_array(array, t.device))
        return IncompatibleKeys(missing, unexpected)

    # --- modes and housekeeping -------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Training mode (BatchNorm uses batch statistics) for this module and its submodules."""
        mode = check_bool("mode", mode, f"{type(self).__name__}.train")
        for m in self.modules():
            m.__dict__["training"] = mode
        return self

    def eval(self) -> Module:
        """Evaluation mode: same as ``train(False)``."""
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients: set them to None (the default) or zeros (``Optimizer.zero_grad``
        says how)."""
        for p in self.parameters():
            clear_grad(p, set_to_none)

    def _convert(self, fn) -> Module:
        """Replace the array of every parameter, gradient and buffer by ``fn(array)``, in place."""
        for t in list(self.parameters()) + list(self.buffers()):
            new = fn(t.data)
            if new is not t.data:
                t.data = new  # new memory: a graph recorded with the old array refuses backward
            if t.grad is not None:
                t.grad = Tensor._wrap(fn(t.grad.data))
        return self

    def to(self, device=None, dtype=None) -> Module:
        """Move parameters and buffers to ``device`` and/or cast floating ones to ``dtype``.

        In place: every Parameter keeps its identity (an optimizer built before
        still holds the right tensors). ``module.to(tm.float64)`` also works.
        """
        if device is not None and not isinstance(device, str):
            device, dtype = None, device  # to(dtype)
        if device is not None:
            device = backend.normalize_device(device)
            self._convert(lambda a: backend.move_array(a, device))
        if dtype is not None:
            dtype = np.dtype(dtype)
            if dtype.kind != "f":
                raise TypeError(f"Module.to: dtype must be floating, got {dtype}")
            self._convert(lambda a: a.astype(dtype) if a.dtype.kind == "f" else a)
        return self

    def float(self) -> Module:
        return self.to(dtype=np.float32)

    def double(self) -> Module:
        return self.to(dtype=np.float64)

    # --- printing ------------------------------------------------------------------------
    def extra_repr(self) -> str:
        """The text inside the parentheses of this module's repr (layers override it)."""
        return ""

    def __repr__(self) -> str:
        lines = [self.extra_repr()] if self.extra_repr() else []
        for name, m in self._modules.items():
            child = repr(m).replace("\n", "\n  ")
            lines.append(f"({name}): {child}")
        if not self._modules:
            return f"{type(self).__name__}({self.extra_repr()})"
        return f"{type(self).__name__}(\n  " + "\n  ".join(lines) + "\n)"
