"""Adam and AdamW (Adam with decoupled weight decay), as PyTorch implements them."""

from __future__ import annotations

import math

from tinymeta import backend
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

    def _update(self, param: Tensor, grad, group: dict) -> None:
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        weight_decay, amsgrad = group["weight_decay"], group["amsgrad"]
        xp = backend.get_array_module(param.data)

        state = self.state.setdefault(param, {})
        if not state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(param.data)
            state["exp_avg_sq"] = xp.zeros_like(param.data)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = xp.zeros_like(param.data)
        state["step"] += 1
        step = state["step"]

        if weight_decay != 0:
            if self.decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad + weight_decay * param.data  # a new array: .grad is left alone

        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg *= beta1
        exp_avg += (1 - beta1) * grad
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * grad * grad

        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        if amsgrad:
            max_exp_avg_sq = state["max_exp_avg_sq"]
            xp.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = xp.sqrt(max_exp_avg_sq) / bias_correction2_sqrt + eps
        else:
            denom = xp.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
        param.add_(exp_avg / denom, alpha=-lr / bias_correction1)


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
