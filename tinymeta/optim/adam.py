"""Adam and AdamW (Adam with decoupled weight decay), as PyTorch implements them."""

from __future__ import annotations

import math

from tinymeta import backend, kernels
from tinymeta._checks import check_bool
from tinymeta.optim.optimizer import Optimizer, check_number
from tinymeta.tensor import Tensor


class Adam(Optimizer):
    """Adam (lr gamma, betas (b1, b2), eps, weight decay lambda), step count t::

        g_t = grad + lambda * theta_{t-1}
        m_t = b1 * m_{t-1} + (1 - b1) * g_t
        v_t = b2 * v_{t-1} + (1 - b2) * g_t**2
        v_max = max(v_max, v_t) if amsgrad  else  v_t      (kept across steps with amsgrad)
        theta_t = theta_{t-1} - (gamma / (1 - b1**t)) * m_t / (sqrt(v_max) / sqrt(1 - b2**t) + eps)

    which is PyTorch's arithmetic (bias corrections folded into the step size
    and the denominator). As in PyTorch, AMSGrad keeps the maximum of the
    *uncorrected* v_t and bias-corrects it afterwards. The state of a
    parameter is ``{"step", "exp_avg", "exp_avg_sq"}`` plus ``"max_exp_avg_sq"``
    with amsgrad.
    """

    # AdamW sets True: weight decay shrinks the parameter instead of joining the gradient.
    decoupled_weight_decay = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
    ):
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict, where: str) -> None:
        super()._check_group(group, where)
        name = self._name()
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
        group["betas"] = tuple(betas)
        for i, beta in enumerate(betas):
            check_number(
                name, "beta", f"betas[{i}]", beta, where, low=0.0, high=1.0, high_open=True
            )
        check_number(name, "epsilon", "eps", group["eps"], where, low=0.0)
        check_number(name, "weight decay", "weight_decay", group["weight_decay"], where, low=0.0)
        check_bool("amsgrad", group["amsgrad"], f"{name} ({where} settings)")

    def _update(self, param: Tensor, grad, group: dict) -> None:
        lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
        array = param._data  # changed in place; _bump() below tells graphs that saved it
        state = self.state.setdefault(param, {})
        if not state:
            state.update(step=0, exp_avg=_zeros_like(array), exp_avg_sq=_zeros_like(array))
        amsgrad = group["amsgrad"]
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = _zeros_like(array)
        state["step"] = step = state["step"] + 1

        param._check_graph_memory(f"{self._name()}.step")
        decoupled = self.decoupled_weight_decay
        # The elementwise part is one kernel call (a compiled loop on the CPU; the NumPy or
        # CuPy reference otherwise) that rounds as the formula above spelt in NumPy would.
        kernels.adam_update_(
            array,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["max_exp_avg_sq"] if amsgrad else None,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            step_size=-lr / (1 - beta1**step),
            bias_correction2_sqrt=math.sqrt(1 - beta2**step),
            weight_decay=0.0 if decoupled else weight_decay,
            param_decay=1 - lr * weight_decay if decoupled else 1.0,
        )
        param._bump()


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter)::

        theta_{t-1} <- theta_{t-1} * (1 - gamma * lambda)      (before the Adam step)

    then the Adam update above with lambda = 0 in the gradient. The default
    weight decay is 1e-2, as in PyTorch.
    """

    decoupled_weight_decay = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)


def _zeros_like(array):
    return backend.get_array_module(array).zeros_like(array)
