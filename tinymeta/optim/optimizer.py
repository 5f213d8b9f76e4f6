"""The ``Optimizer`` base class: parameter groups, ``step``, ``zero_grad``, state dicts.

Parameters are organised in *groups*: a list of dicts, each holding
``"params"`` (a list of tensors) and that group's hyper-parameters (``"lr"``,
...). A hyper-parameter that a group does not set takes the value given to the
constructor. Per-parameter state (momentum buffers, Adam's moments) lives in
``optimizer.state[param]``, a dict of arrays and scalars, created on the first
step that updates the parameter.

``state_dict()`` uses PyTorch's layout: parameters are replaced by their index
in the order the groups list them::

    {"state": {0: {"momentum_buffer": array}, ...},
     "param_groups": [{"lr": 0.1, "momentum": 0.9, ..., "params": [0, 1]}, ...]}

so that the state can be loaded into an optimizer built over *other* tensors
(the same model re-created after a restart) with the same group structure.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from tinymeta import backend
from tinymeta._checks import check_real
from tinymeta.grad_mode import enable_grad, no_grad
from tinymeta.tensor import Tensor, clear_grad


class Optimizer:
    """Base class: subclasses define ``_update(param, grad, group)`` and ``_check_group``.

    ``defaults`` maps each hyper-parameter to the value groups use unless they
    set their own. The state is keyed by the parameter tensor itself (tensors
    hash by identity, so this is a lookup by object, never by value).
    """

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        self._check_group(self.defaults, "the constructor's")
        self.state: dict[Tensor, dict] = {}
        self.param_groups: list[dict] = []
        for group in _as_groups(params, self._name()):
            self.add_param_group(group)

    # --- groups -----------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Add a group of parameters (e.g. layers unfrozen later) with its own hyper-parameters."""
        name = self._name()
        if not isinstance(param_group, dict):
            raise TypeError(f"{name}: a parameter group must be a dict, got {type(param_group)}")
        if "params" not in param_group:
            raise ValueError(f"{name}: a parameter group needs a 'params' entry")
        params = _as_param_list(param_group["params"], name)
        index = len(self.param_groups)
        if not params:
            raise ValueError(f"{name}: parameter group {index} is empty")

        seen_here: set[int] = set()
        seen_before = {
            id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]
        }
        for k, p in enumerate(params):
            _check_param(p, f"{name}: parameter {k} of group {index}")
            if id(p) in seen_here:
                raise ValueError(
                    f"{name}: parameter {k} of group {index} (shape {p.shape}) appears more "
                    "than once in the group"
                )
            if id(p) in seen_before:
                raise ValueError(
                    f"{name}: parameter {k} of group {index} (shape {p.shape}) is already in "
                    f"parameter group {seen_before[id(p)]}; a parameter may belong to one group"
                )
            seen_here.add(id(p))

        group = {"params": params}
        for key, value in param_group.items():
            if key != "params":
                group[key] = value
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._check_group(group, f"parameter group {index}'s")
        self.param_groups.append(group)

    # --- the update -------------------------------------------------------------
    def step(self, closure: Callable | None = None):
        """Update every parameter that has a gradient; returns ``closure()`` if given.

        ``closure`` re-evaluates the model and returns the loss (it runs with
        grad mode on, as it normally calls backward). Parameters whose ``.grad``
        is None are skipped, and get no state.
        """
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        with no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    grad = p.grad._data  # read, never handed out: the slot, not .data
                    if grad.shape != p.shape:
                        raise RuntimeError(
                            f"{self._name()}.step: a parameter of shape {p.shape} has a "
                            f"gradient of shape {grad.shape}"
                        )
                    self._update(p, grad, group)
        return loss

    def _update(self, param: Tensor, grad, group: dict) -> None:
        """Change ``param`` in place from ``grad`` (an array) with ``group``'s hyper-parameters."""
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients: set ``.grad`` to None (default), or to zeros.

        Zeros are written into ``.grad``'s own memory, as PyTorch does: a reference taken
        before sees them, and a graph that saved the old ``.grad`` refuses its backward (the
        version moves). A ``.grad`` that a graph computed (``backward(create_graph=True)``)
        or a read-only one gets zeros of its own instead (PyTorch detaches it first).
        """
        for group in self.param_groups:
            for p in group["params"]:
                clear_grad(p, set_to_none)

    # --- saving and resuming ----------------------------------------------------------
    def state_dict(self) -> dict:
        """A snapshot of the state (arrays copied), parameters named by their index.

        Indices count parameters across groups, in group order. Taking a
        snapshot (PyTorch returns references) means a saved dict does not
        change as training goes on.
        """
        index = {}
        groups = []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                index[id(p)] = len(index)
                ids.append(index[id(p)])
            saved = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            saved["params"] = ids
            groups.append(saved)
        state = {
            index[id(p)]: {k: _copy_value(v) for k, v in s.items()}
            for p, s in self.state.items()
            if id(p) in index
        }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyper-parameters and state saved by ``state_dict()``.

        The groups must have the same number of parameters, in the same order,
        as when the state was saved. Arrays are copied and cast to each
        parameter's dtype and device.
        """
        name = self._name()
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(
                f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups'"
            )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{name}.load_state_dict: the saved state has {len(saved_groups)} parameter "
                f"groups, this optimizer has {len(self.param_groups)}"
            )
        by_index = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{name}.load_state_dict: parameter group {i} has {len(group['params'])} "
                    f"parameters, the saved group has {len(saved['params'])}"
                )
            for k, p in zip(saved["params"], group["params"]):
                by_index[int(k)] = p

        new_state = {}
        for k, saved in state_dict["state"].items():
            if int(k) not in by_index:
                raise ValueError(f"{name}.load_state_dict: state for unknown parameter index {k}")
            p = by_index[int(k)]
            new_state[p] = {key: _value_like(v, p, key, name) for key, v in saved.items()}

        new_groups = []
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            new = {"params": group["params"]}
            new.update({k: copy.deepcopy(v) for k, v in saved.items() if k != "params"})
            self._check_group(new, f"the saved parameter group {i}'s")
            new_groups.append(new)
        self.state = new_state
        self.param_groups = new_groups

    # --- helpers ----------------------------------------------------------------------
    def _check_group(self, group: dict, where: str) -> None:
        """Raise a clear error for an invalid hyper-parameter; subclasses extend this."""
        if "lr" in group:
            check_number(self._name(), "learning rate", "lr", group["lr"], where, low=0.0)

    @classmethod
    def _name(cls) -> str:
        return cls.__name__

    def __repr__(self) -> str:
        lines = [f"{self._name()} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)


# --- validation ---------------------------------------------------------------------


def check_number(
    opt: str,
    what: str,
    key: str,
    value,
    where: str,
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
) -> None:
    """Raise TypeError unless ``value`` is a real number (not a bool), ValueError unless it is
    finite and ``low <= value <= high`` (``< high`` with ``high_open``): tinymeta._checks's
    rule, with the optimizer's wording (which settings: the constructor's or a group's)."""
    try:
        check_real(key, value, opt, low=low, high=high, high_open=high_open)
    except ValueError:
        bounds = f"[{low}, {high}{')' if high_open else ']'}" if high is not None else f">= {low}"
        raise ValueError(
            f"{opt}: invalid {what} {key}={value!r} in {where} settings: must be finite and "
            f"{bounds}"
        ) from None


def _check_param(p, where: str) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"{where} is a {type(p).__name__}; an optimizer updates Tensors")
    if p.dtype.kind not in "fc":
        raise TypeError(
            f"{where} has dtype {p.dtype} (shape {p.shape}); only floating-point tensors "
            "can be optimized"
        )
    if not p.requires_grad:
        raise ValueError(
            f"{where} (shape {p.shape}) does not require grad; create it with "
            "requires_grad=True or call .requires_grad_()"
        )
    if not p.is_leaf:
        raise ValueError(
            f"{where} (shape {p.shape}) is not a leaf: it was computed by "
            f"{p.grad_fn.op_name()}; optimize a leaf copy, e.g. (x.detach() * 1.0).requires_grad_()"
        )


def _as_param_list(params, opt: str) -> list:
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, (set, frozenset)):
        raise TypeError(
            f"{opt}: parameters must be given in a fixed order (a list or tuple), not a set: "
            "state_dict() names them by position"
        )
    return list(params)


def _as_groups(params, opt: str) -> list:
    """The constructor's ``params``: an iterable of tensors, or of group dicts."""
    if isinstance(params, Tensor):
        raise TypeError(
            f"{opt}: params must be an iterable of Tensors or of dicts, got a single Tensor "
            f"(shape {params.shape}); pass [tensor]"
        )
    if isinstance(params, dict) or not isinstance(params, Iterable):
        raise TypeError(
            f"{opt}: params must be an iterable of Tensors or of dicts, got {type(params).__name__}"
        )
    items = _as_param_list(params, opt)
    if not items:
        raise ValueError(f"{opt}: got an empty parameter list")
    if all(isinstance(item, dict) for item in items):
        return items
    if any(isinstance(item, dict) for item in items):
        raise TypeError(f"{opt}: params mixes tensors and group dicts; use one or the other")
    return [{"params": items}]


# --- state values -----------------------------------------------------------------------


def _copy_value(v):
    if hasattr(v, "shape") and hasattr(v, "dtype"):  # a NumPy or CuPy array
        return v.copy()
    return copy.deepcopy(v)


def _value_like(v, p: Tensor, key: str, opt: str):
    """A saved state value made ready for ``p``: arrays copied onto its device and dtype."""
    if isinstance(v, Tensor):
        v = v.data
    if not (hasattr(v, "shape") and hasattr(v, "dtype")):
        return copy.deepcopy(v)
    if v.ndim == 0:  # a scalar (the step count) that went through a file as a 0-d array
        return v.item()
    if tuple(v.shape) != p.shape:
        raise ValueError(
            f"{opt}.load_state_dict: state {key!r} has shape {tuple(v.shape)}, but its "
            f"parameter has shape {p.shape}"
        )
    xp = backend.get_array_module(p.data)
    array = backend.move_array(v, p.device)
    return xp.array(array, dtype=p.dtype, copy=True)
