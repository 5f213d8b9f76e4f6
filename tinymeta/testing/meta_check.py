"""Is my meta-gradient right? Finite differences of the whole meta-loss, with a diagnosis.

``check_meta_grads(meta_loss, params)`` takes the user's whole inner-plus-outer
computation, ``meta_loss(params) -> scalar``, and compares three derivatives
of it along a few random directions per parameter (every element with
``full=True``):

* the meta-gradient that tinymeta's backward gives;
* central finite differences of ``meta_loss`` itself, in float64: the truth;
* the first-order meta-gradient: ``meta_loss`` run again under
  ``first_order_inner_grads()``, where every ``tm.grad(..., create_graph=True)``
  inside it returns constants (FOMAML's approximation).

When the meta-gradient disagrees with the finite differences, the third one
tells a forgotten ``create_graph=True`` (the meta-gradient *is* the
first-order one) from other bugs, and a parameter that gets no gradient while
the loss changes with it is named as cut from the graph.

The parameters are perturbed in place (their ``.data`` is swapped, then put
back), so ``meta_loss`` may use the ``params`` it is given or close over the
same tensors (a module's parameters, an update rule's learned rates).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tinymeta.autograd import grad
from tinymeta.autograd.first_order import first_order_inner_grads
from tinymeta.backend import get_array_module, to_numpy
from tinymeta.grad_mode import enable_grad
from tinymeta.tensor import Tensor

__all__ = [
    "MetaGradCheck",
    "ParamCheck",
    "TaskIndependenceCheck",
    "assert_meta_grads_close",
    "check_meta_grads",
    "check_task_independence",
]

FIRST_ORDER_DIAGNOSIS = (
    "the meta-gradient equals the first-order approximation: an inner gradient was taken "
    "without create_graph=True"
)


@dataclass
class ParamCheck:
    """One parameter's derivatives along its probe directions.

    ``analytic[i]``, ``numerical[i]`` and ``first_order[i]`` are v_i . gradient
    for the i-th probe direction v_i: a random unit vector, or the i-th element
    (``elements[i]``) when every element was probed. ``first_order`` is None if
    ``meta_loss`` could not be re-run first order. ``status`` is ``"ok"``,
    ``"unused"`` (no gradient, and the loss does not change with it either),
    ``"cut"`` (no gradient although the loss changes with it),
    ``"first-order"`` (the gradient is the first-order one) or ``"mismatch"``.
    """

    name: str
    shape: tuple
    analytic: np.ndarray
    numerical: np.ndarray
    first_order: np.ndarray | None
    elements: list | None
    gradient_is_none: bool
    status: str = "ok"

    @property
    def errors(self) -> np.ndarray:
        """|analytic - numerical| per probe."""
        return np.abs(self.analytic - self.numerical)

    @property
    def worst(self) -> int:
        """The probe where analytic and numerical differ most."""
        return int(np.argmax(self.errors))

    @property
    def relative_error(self) -> float:
        """The worst probe's |analytic - numerical| / max(|analytic|, |numerical|)."""
        i = self.worst
        scale = max(abs(self.analytic[i]), abs(self.numerical[i]))
        return float(self.errors[i] / scale) if scale > 0 else 0.0

    def probe_name(self, i: int) -> str:
        if self.elements is not None:
            return f"element {self.elements[i]}"
        return f"direction {i + 1} of {len(self.analytic)}"

    def describe(self) -> str:
        """One line: the worst probe's three values."""
        i = self.worst
        what = "None" if self.gradient_is_none else f"{self.analytic[i]:.8g}"
        line = (
            f"{self.name!r} (shape {self.shape}), {self.probe_name(i)}: meta-gradient {what} "
            f"vs finite difference {self.numerical[i]:.8g}"
        )
        if self.first_order is not None:
            line += f", first order {self.first_order[i]:.8g}"
        if self.status not in ("ok", "unused"):
            line += f", relative error {self.relative_error:.2g}"
        return line + f" [{self.status}]"


@dataclass
class MetaGradCheck:
    """What ``check_meta_grads`` found: ``ok``, a ``diagnosis`` and one ``ParamCheck`` each."""

    ok: bool
    diagnosis: str
    params: dict = field(default_factory=dict)
    loss: float = float("nan")
    first_order_error: str | None = None
    tolerance: tuple = (1e-5, 1e-3)  # (atol, rtol)

    @property
    def second_order_seen(self) -> bool:
        """Whether the first-order meta-gradient differs from the finite differences somewhere
        (if not, a silently first-order meta-gradient would pass)."""
        return any(
            p.first_order is not None and not _close(p.first_order, p.numerical, *self.tolerance)
            for p in self.params.values()
        )

    @property
    def failed(self) -> list:
        """The parameters whose meta-gradient is wrong, worst first."""
        bad = [p for p in self.params.values() if p.status not in ("ok", "unused")]
        return sorted(bad, key=lambda p: -p.errors.max(initial=0.0))

    @property
    def worst(self) -> ParamCheck | None:
        """The parameter with the largest error among the failed ones (None if all passed)."""
        return self.failed[0] if self.failed else None

    def report(self) -> str:
        head = "meta-gradient check passed" if self.ok else "meta-gradient check FAILED"
        lines = [f"{head} (meta-loss {self.loss:.8g})", self.diagnosis]
        if self.worst is not None:
            lines.append(f"worst parameter: {self.worst.describe()}")
        if self.params:
            lines.append("every parameter:")
            lines += ["  " + p.describe() for p in self.params.values()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


def check_meta_grads(
    meta_loss: Callable,
    params: dict | Sequence[Tensor],
    directions: int = 3,
    full: bool = False,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    seed: int = 0,
) -> MetaGradCheck:
    """Compare the meta-gradient of ``meta_loss(params)`` with finite differences; diagnose.

    ``params`` is a dict name -> tensor (``dict(model.named_parameters())``
    plus any learned rates) or a sequence of tensors: float64 leaves that
    require grad. ``meta_loss`` is called with ``params`` as given and must
    return a scalar tensor; it must be deterministic (same parameters, same
    value). Each parameter is probed along ``directions`` random unit
    directions, or element by element with ``full=True`` (or when it has no
    more elements than ``directions``). A probe passes when
    ``|analytic - numerical| <= atol + rtol * |numerical|``.

    ``meta_loss`` runs about ``2 * directions`` times per parameter, and its
    side effects happen every time (the running statistics of batch norm
    layers in training mode are updated, say).

    Returns a ``MetaGradCheck``; raises nothing for a wrong gradient (see
    ``assert_meta_grads_close``), only for unusable arguments.
    """
    named = _named_params(params)
    _check_options(directions, eps, atol, rtol)
    tensors = list(named.values())

    loss = _scalar_loss(meta_loss, params)
    value = float(loss.item())
    analytic = _gradients(loss, tensors)
    again = _evaluate(meta_loss, params)
    # Noise of this size moves a finite difference by (noise / eps) / 2 = atol / 20.
    if abs(again - value) > 0.1 * eps * atol:
        return _not_deterministic(value, again)
    first_order, first_order_error = _first_order_gradients(meta_loss, params, tensors)

    rng = np.random.default_rng(seed)
    checks = {}
    for (name, p), g, g1 in zip(named.items(), analytic, first_order):
        probes, elements = _probes(p.shape, directions, full, rng)
        check = ParamCheck(
            name=name,
            shape=tuple(p.shape),
            analytic=np.array([_dot(v, g) for v in probes]),
            numerical=np.array([_directional_fd(meta_loss, params, p, v, eps) for v in probes]),
            first_order=None if g1 is _FAILED else np.array([_dot(v, g1) for v in probes]),
            elements=elements,
            gradient_is_none=g is None,
        )
        check.status = _status(check, g, atol, rtol)
        checks[name] = check
    ok = all(c.status in ("ok", "unused") for c in checks.values())
    result = MetaGradCheck(
        ok=ok,
        diagnosis="",
        params=checks,
        loss=value,
        first_order_error=first_order_error,
        tolerance=(atol, rtol),
    )
    result.diagnosis = _diagnosis(result)
    return result


def assert_meta_grads_close(meta_loss: Callable, params, **options) -> MetaGradCheck:
    """``check_meta_grads`` for test suites: raises AssertionError with the report on failure.

    The message leads with the diagnosis and the worst parameter (its
    meta-gradient, finite difference and first-order value), then lists every
    parameter. Returns the passing result.
    """
    result = check_meta_grads(meta_loss, params, **options)
    if not result.ok:
        raise AssertionError(result.report())
    return result


def _not_deterministic(value: float, again: float) -> MetaGradCheck:
    return MetaGradCheck(
        ok=False,
        loss=value,
        diagnosis=(
            f"meta_loss is not deterministic: two calls at the same parameters gave {value!r} "
            f"and {again!r}. Finite differences need the same value for the same parameters: "
            "fix the random draws inside it (a seeded rng per call) and make sure it does not "
            "read state that it changes (running statistics in eval mode)."
        ),
    )


# --- arguments ------------------------------------------------------------------------------


def _named_params(params, caller: str = "check_meta_grads") -> dict:
    if isinstance(params, dict):
        named = {str(k): v for k, v in params.items()}
        where = {str(k): f"params[{k!r}]" for k in params}
    elif isinstance(params, (list, tuple)):
        named = {f"params[{i}]": v for i, v in enumerate(params)}
        where = {k: k for k in named}
    else:
        raise TypeError(
            f"{caller}: params must be a dict of tensors (name -> tensor) or a list/tuple "
            f"of tensors, got {type(params).__name__}"
        )
    if not named:
        raise ValueError(f"{caller}: params is empty; nothing to check")
    seen: dict = {}
    for k, p in named.items():
        label = where[k]
        if not isinstance(p, Tensor):
            raise TypeError(f"{caller}: {label} is a {type(p).__name__}, expected a Tensor")
        if p.dtype != np.float64:
            raise TypeError(
                f"{caller}: {label} has dtype {p.dtype} (shape {p.shape}, device "
                f"{p.device}); finite differences need float64: build the model and rates "
                "with dtype=tm.float64"
            )
        if not p.requires_grad or not p.is_leaf:
            raise ValueError(
                f"{caller}: {label} (shape {p.shape}) must be a leaf that requires grad "
                f"(requires_grad={p.requires_grad}, is_leaf={p.is_leaf}): pass the tensors that "
                "meta_loss starts from"
            )
        if id(p) in seen:
            raise ValueError(f"{caller}: {label} is the same tensor as {seen[id(p)]}")
        seen[id(p)] = label
    return named


def _check_options(directions, eps, atol, rtol) -> None:
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise ValueError(f"check_meta_grads: directions must be an int >= 1, got {directions!r}")
    for label, v in (("eps", eps), ("atol", atol), ("rtol", rtol)):
        if not v >= 0 or (label == "eps" and v == 0):
            raise ValueError(f"check_meta_grads: {label} must be positive, got {v!r}")


def _scalar_loss(meta_loss, params, caller: str = "check_meta_grads") -> Tensor:
    with enable_grad():
        loss = meta_loss(params)
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"{caller}: meta_loss returned a {type(loss).__name__}, expected a scalar Tensor"
        )
    if loss.size != 1:
        raise ValueError(
            f"{caller}: meta_loss returned a tensor of shape {loss.shape}, expected a "
            "scalar (take the mean over tasks)"
        )
    return loss


# --- derivatives ----------------------------------------------------------------------------

_FAILED = object()  # the first-order re-run raised


def _gradients(loss: Tensor, tensors: list) -> list:
    """Host float64 gradients, None for a tensor the loss does not reach through the graph."""
    if not loss.requires_grad:
        return [None] * len(tensors)
    gs = grad(loss, tensors, allow_unused=True)
    return [None if g is None else to_numpy(g.data).astype(np.float64) for g in gs]


def _first_order_gradients(meta_loss, params, tensors: list):
    """The meta-gradient with every inner gradient a constant, and the error if it failed."""
    try:
        with first_order_inner_grads():
            loss = _scalar_loss(meta_loss, params)
        return _gradients(loss, tensors), None
    except Exception as e:  # code that differentiates an inner gradient again, say
        return [_FAILED] * len(tensors), f"{type(e).__name__}: {e}"


def _evaluate(meta_loss, params) -> float:
    return float(_scalar_loss(meta_loss, params).item())


def _directional_fd(meta_loss, params, p: Tensor, v: np.ndarray, eps: float) -> float:
    """(f(p + eps v) - f(p - eps v)) / (2 eps), with p's data swapped and put back."""
    original = p.data
    step = get_array_module(original).asarray(eps * v)
    try:
        p.data = original + step
        plus = _evaluate(meta_loss, params)
        p.data = original - step
        minus = _evaluate(meta_loss, params)
    finally:
        p.data = original
    return (plus - minus) / (2 * eps)


def _probes(shape: tuple, directions: int, full: bool, rng) -> tuple:
    """Unit directions for one parameter, and the element of each (None if random)."""
    size = int(np.prod(shape))
    if full or size <= directions:
        elements = [tuple(int(i) for i in j) for j in np.ndindex(*shape)]
        probes = [np.eye(1, size, k).reshape(shape) for k in range(size)]
        return probes, elements
    probes = []
    for _ in range(directions):
        v = rng.standard_normal(shape)
        probes.append(v / np.linalg.norm(v))
    return probes, None


def _dot(v: np.ndarray, g) -> float:
    return 0.0 if g is None else float(np.sum(v * g))


# --- diagnosis ------------------------------------------------------------------------------


def _close(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> bool:
    return bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(b)))


def _status(check: ParamCheck, g, atol: float, rtol: float) -> str:
    if _close(check.analytic, check.numerical, atol, rtol):
        return "unused" if g is None else "ok"
    if g is None or not np.any(g):
        return "cut"
    if check.first_order is not None and _close(check.analytic, check.first_order, atol, rtol):
        return "first-order"
    return "mismatch"


def _names(checks: list) -> str:
    return ", ".join(repr(c.name) for c in checks)


def _diagnosis(result: MetaGradCheck) -> str:
    by_status: dict = {}
    for c in result.params.values():
        by_status.setdefault(c.status, []).append(c)
    if result.ok:
        line = "the meta-gradient matches finite differences of meta_loss for every parameter"
        if not result.second_order_seen:
            line += (
                "; note: the first-order approximation matches them too, so this check could not "
                "tell a missing create_graph=True here (a larger inner rate or more inner steps "
                "makes the second-order terms visible)"
            )
        return line
    lines = []
    if "first-order" in by_status:
        lines.append(
            f"{FIRST_ORDER_DIAGNOSIS} (the meta-gradient of {_names(by_status['first-order'])} "
            "is the first-order one; finite differences include the second-order terms)"
        )
    if "cut" in by_status:
        lines.append(
            f"cut from the graph: {_names(by_status['cut'])} get no meta-gradient (None or zero) "
            "although the meta-loss changes with them: detached, used through .data, .item() or "
            "float(), or replaced by a copy inside the inner loop"
        )
    if "mismatch" in by_status:
        worst = max(by_status["mismatch"], key=lambda c: c.errors.max())
        lines.append(
            f"the meta-gradient of {_names(by_status['mismatch'])} differs from finite differences "
            f"(worst: {worst.describe()}); it is not the first-order approximation either: an "
            "update rule or backward rule computes something other than what meta_loss evaluates"
        )
    if result.first_order_error is not None:
        lines.append(f"(meta_loss could not be re-run first order: {result.first_order_error})")
    return "\n".join(lines)


# --- tasks must not see each other ------------------------------------------------------------


@dataclass
class TaskIndependenceCheck:
    """What ``check_task_independence`` found: the meta-batch's meta-loss and meta-gradient
    against the means of the single-task ones."""

    ok: bool
    diagnosis: str
    batch_loss: float
    task_losses: list
    gradient_errors: dict  # name -> max |batch gradient - mean of task gradients|

    def __str__(self) -> str:
        return self.diagnosis


def check_task_independence(
    meta_loss: Callable,
    params: dict | Sequence[Tensor],
    num_tasks: int,
    rtol: float = 1e-9,
    atol: float = 1e-12,
) -> TaskIndependenceCheck:
    """Check that the tasks of a meta-batch do not see each other.

    ``meta_loss(params, tasks)`` is the mean over the tasks whose indices are
    in the list ``tasks`` of their meta-losses. For a meta-learner whose tasks
    are independent, the meta-batch's value and meta-gradient equal the means
    of the single-task ones: batch statistics computed across tasks (a batch
    norm over the flattened meta-batch), or an update rule whose state is
    shared by the tasks, break that. Returns a ``TaskIndependenceCheck``.
    """
    named = _named_params(params, "check_task_independence")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 2:
        raise ValueError(
            f"check_task_independence: num_tasks must be an int >= 2, got {num_tasks!r}"
        )
    tensors = list(named.values())

    def value_and_grads(tasks):
        loss = _scalar_loss(lambda p: meta_loss(p, tasks), params, "check_task_independence")
        return float(loss.item()), _gradients(loss, tensors)

    batch_loss, batch_grads = value_and_grads(list(range(num_tasks)))
    singles = [value_and_grads([t]) for t in range(num_tasks)]
    task_losses = [v for v, _ in singles]
    mean_loss = float(np.mean(task_losses))
    errors = {}
    for i, (name, g) in enumerate(zip(named, batch_grads)):
        parts = [gs[i] for _, gs in singles]
        if g is None and all(part is None for part in parts):
            continue
        mean = sum(np.zeros(named[name].shape) if part is None else part for part in parts)
        mean = mean / num_tasks
        batch = np.zeros(named[name].shape) if g is None else g
        if not np.allclose(batch, mean, rtol=rtol, atol=atol):
            errors[name] = float(np.max(np.abs(batch - mean)))
    loss_ok = bool(np.isclose(batch_loss, mean_loss, rtol=rtol, atol=atol))
    ok = loss_ok and not errors
    if ok:
        diagnosis = (
            f"the {num_tasks} tasks are independent: the meta-batch's meta-loss and meta-gradient "
            "equal the means of the single-task ones"
        )
    else:
        diagnosis = (
            f"the tasks of the meta-batch are not independent: its meta-loss is {batch_loss:.10g}, "
            f"the mean of the single-task meta-losses {mean_loss:.10g}"
        )
        if errors:
            diagnosis += f"; the meta-gradients of {_names_of(errors)} differ too"
        diagnosis += (
            ". Something is shared across tasks: batch statistics over the whole meta-batch "
            "(normalise per task), or an update rule's state shared by the tasks"
        )
    return TaskIndependenceCheck(ok, diagnosis, batch_loss, task_losses, errors)


def _names_of(errors: dict) -> str:
    return ", ".join(f"{k!r} (by {v:.3g})" for k, v in errors.items())
