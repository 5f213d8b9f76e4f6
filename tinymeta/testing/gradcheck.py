"""Compare analytic derivatives with central finite differences, in float64.

The fast default is directional (as in PyTorch's fast mode): for a random
output cotangent v and a random input direction u, the analytic v^T J u (one
backward pass) must equal the finite difference of s(x) = <v, f(x)> along u.
When a direction disagrees, the check falls back to element-by-element finite
differences of that input to name the worst element. Higher orders are checked
recursively (as HIPS autograd does): the gradient function x, v -> J(x)^T v is
itself a function whose gradient can be checked.
"""

from __future__ import annotations

import numpy as np

from tinymeta.autograd import grad
from tinymeta.backend import get_array_module, to_numpy
from tinymeta.grad_mode import enable_grad, no_grad
from tinymeta.tensor import Tensor


def _as_float64_inputs(inputs) -> list:
    """Fresh float64 leaves for floating inputs; anything else is passed through unchanged."""
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    out = []
    for x in inputs:
        array = x.data if isinstance(x, Tensor) else x
        if hasattr(array, "dtype") and array.dtype.kind == "f":
            xp = get_array_module(array)
            out.append(Tensor(xp.array(array, dtype=np.float64), requires_grad=True))
        elif isinstance(array, float):
            out.append(Tensor(np.array(array, dtype=np.float64), requires_grad=True))
        else:
            out.append(x)
    return out


def _outputs_tuple(y) -> tuple:
    return tuple(y) if isinstance(y, (list, tuple)) else (y,)


def _differentiable(inputs) -> list:
    return [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]


def _project(fn, inputs, vs) -> float:
    """s(x) = sum_k <v_k, f_k(x)>, evaluated without recording a graph."""
    with no_grad():
        ys = _outputs_tuple(fn(*inputs))
    return float(sum(np.sum(to_numpy(y.data).astype(np.float64) * v) for y, v in zip(ys, vs)))


def _shifted(inputs, i, delta):
    shifted = list(inputs)
    # Keep requires_grad: a vjp function differentiates w.r.t. its inputs inside.
    shifted[i] = Tensor(inputs[i].data + delta, requires_grad=True)
    return shifted


def _analytic_vjp(fn, inputs, rng):
    """Outputs' random cotangents and J^T v for every differentiable input."""
    with enable_grad():
        ys = _outputs_tuple(fn(*inputs))
    vs = [rng.standard_normal(y.shape) for y in ys]
    live = [(y, v) for y, v in zip(ys, vs) if isinstance(y, Tensor) and y.requires_grad]
    idx = _differentiable(inputs)
    if not live or not idx:
        return vs, {i: np.zeros(inputs[i].shape) for i in idx}
    gs = grad(
        [y for y, _ in live],
        [inputs[i] for i in idx],
        grad_outputs=[Tensor(_like(v, y.data)) for y, v in live],
        allow_unused=True,
    )
    grads = {}
    for i, g in zip(idx, gs):
        grads[i] = np.zeros(inputs[i].shape) if g is None else to_numpy(g.data).astype(np.float64)
    return vs, grads


def _like(array: np.ndarray, ref):
    """``array`` on the device and in the dtype of ``ref``."""
    return get_array_module(ref).asarray(array, dtype=ref.dtype)


def _elementwise_numeric(fn, inputs, i, vs, eps):
    x = inputs[i]
    numeric = np.zeros(x.shape)
    flat = numeric.reshape(-1)
    for j in range(x.size):
        e = np.zeros(x.size)
        e[j] = eps
        delta = _like(e.reshape(x.shape), x.data)
        plus = _project(fn, _shifted(inputs, i, delta), vs)
        minus = _project(fn, _shifted(inputs, i, -delta), vs)
        flat[j] = (plus - minus) / (2 * eps)
    return numeric


def _fail(name, i, x, analytic, numeric, what):
    err = np.abs(analytic - numeric)
    j = np.unravel_index(int(np.argmax(err)), err.shape) if err.ndim else ()
    raise AssertionError(
        f"{name}: {what} mismatch for input {i} (shape {x.shape}); "
        f"worst element {tuple(map(int, j))}: "
        f"analytic {analytic[j]:.8g} vs numerical {numeric[j]:.8g} (|diff| {err[j]:.3g})"
    )


def gradcheck(
    fn,
    inputs,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    full: bool = False,
    seed: int = 0,
    name: str = "gradcheck",
) -> bool:
    """Check the first derivatives of ``fn(*inputs)`` against central finite differences.

    Floating inputs are copied to float64 leaves. ``full=True`` compares every
    element (one finite difference per input element); the default compares
    one random direction per input and only localises the error on failure.
    Returns True or raises AssertionError naming the input and worst element.
    """
    inputs = _as_float64_inputs(inputs)
    rng = np.random.default_rng(seed)
    vs, grads = _analytic_vjp(fn, inputs, rng)
    for i, g in grads.items():
        x = inputs[i]
        if full:
            numeric = _elementwise_numeric(fn, inputs, i, vs, eps)
            if not np.allclose(g, numeric, atol=atol, rtol=rtol):
                _fail(name, i, x, g, numeric, "gradient")
            continue
        u = rng.standard_normal(x.shape)
        delta = _like(eps * u, x.data)
        plus = _project(fn, _shifted(inputs, i, delta), vs)
        minus = _project(fn, _shifted(inputs, i, -delta), vs)
        numeric_dir = (plus - minus) / (2 * eps)
        analytic_dir = float(np.sum(g * u))
        # `not <=`: a nan on either side must fail, and `nan > tol` is False
        if not abs(analytic_dir - numeric_dir) <= atol + rtol * abs(numeric_dir):
            numeric = _elementwise_numeric(fn, inputs, i, vs, eps)
            if np.allclose(g, numeric, atol=atol, rtol=rtol):  # directional noise only
                continue
            _fail(name, i, x, g, numeric, "gradient")
    return True


def vjp_function(fn, n_inputs: int):
    """The function (x_1..x_n, v_1..v_m) -> J(x)^T v, differentiable (create_graph=True).

    Inputs that the outputs do not depend on get a zero gradient, so that the
    result is always defined and can be checked again.
    """

    def vjp(*args):
        xs, vs = list(args[:n_inputs]), list(args[n_inputs:])
        with enable_grad():
            ys = _outputs_tuple(fn(*xs))
            idx = _differentiable(xs)
            live = [k for k, y in enumerate(ys) if isinstance(y, Tensor) and y.requires_grad]
            if not live or not idx:
                return tuple(Tensor(xs[i].data * 0) for i in idx)
            gs = grad(
                [ys[k] for k in live],
                [xs[i] for i in idx],
                grad_outputs=[vs[k] for k in live],
                create_graph=True,
                allow_unused=True,
            )
        return tuple(Tensor(xs[i].data * 0) if g is None else g for i, g in zip(idx, gs))

    return vjp


def _cotangents(fn, inputs, rng) -> list:
    with no_grad():
        ys = _outputs_tuple(fn(*inputs))
    return [Tensor(_like(rng.standard_normal(y.shape), y.data), requires_grad=True) for y in ys]


def gradgradcheck(
    fn,
    inputs,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    full: bool = False,
    seed: int = 0,
) -> bool:
    """Check second derivatives: gradcheck of (x, v) -> J(x)^T v, w.r.t. x and v."""
    return check_grads(fn, inputs, order=2, eps=eps, atol=atol, rtol=rtol, full=full, seed=seed)


def check_grads(
    fn,
    inputs,
    order: int = 2,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    full: bool = False,
    seed: int = 0,
) -> bool:
    """Check derivatives of ``fn`` of every order up to ``order``, recursively.

    Order 1 is ``gradcheck(fn)``; order k checks the gradient of the
    (k-1)-th vector-Jacobian-product function.
    """
    if order < 1:
        raise ValueError(f"check_grads: order must be >= 1, got {order}")
    inputs = _as_float64_inputs(inputs)
    rng = np.random.default_rng(seed + 1)
    for k in range(1, order + 1):
        gradcheck(fn, inputs, eps, atol, rtol, full, seed + k, name=f"check_grads(order {k})")
        if k == order:
            break
        vs = _cotangents(fn, inputs, rng)
        fn = vjp_function(fn, len(inputs))
        inputs = inputs + vs
    return True
