"""Stochastic gradient descent, with momentum, dampening, Nesterov and weight decay."""

from __future__ import annotations

from tinymeta import kernels
from tinymeta._checks import check_bool
from tinymeta.optim.optimizer import Optimizer, check_number
from tinymeta.tensor import Tensor


class SGD(Optimizer):
    """SGD as PyTorch defines it (lr gamma, momentum mu, dampening tau, weight decay lambda)::

        g_t = grad + lambda * theta_{t-1}
        b_t = g_t                                 (first step)
        b_t = mu * b_{t-1} + (1 - tau) * g_t      (later steps)
        g_t = g_t + mu * b_t  if nesterov  else  b_t      (when mu != 0)
        theta_t = theta_{t-1} - gamma * g_t

    The momentum buffer ``b`` is ``state[p]["momentum_buffer"]``; without
    momentum the optimizer keeps no state.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict, where: str) -> None:
        super()._check_group(group, where)
        name = self._name()
        check_number(name, "momentum", "momentum", group["momentum"], where, low=0.0)
        check_number(name, "dampening", "dampening", group["dampening"], where, low=0.0)
        check_number(name, "weight decay", "weight_decay", group["weight_decay"], where, low=0.0)
        check_bool("nesterov", group["nesterov"], f"{name} ({where} settings)")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"{name}: Nesterov momentum needs momentum > 0 and dampening = 0 "
                f"({where} settings have momentum={group['momentum']}, "
                f"dampening={group['dampening']})"
            )

    def _update(self, param: Tensor, grad, group: dict) -> None:
        # As Adam (and add_): memory a graph computed is not changed behind its back.
        param._check_graph_memory(f"{self._name()}.step")
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        if weight_decay != 0:
            grad = grad + weight_decay * param._data  # a new array: .grad itself is left alone
        if momentum != 0:
            state = self.state.setdefault(param, {})
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.copy()
            else:
                buf *= momentum
                dampening = group["dampening"]
                buf += grad if dampening == 0 else (1 - dampening) * grad
            grad = grad + momentum * buf if group["nesterov"] else buf
        # theta -= gamma * g in one pass over memory (a kernel): NumPy's param -= lr * grad
        # first writes lr * grad to a temporary array and reads it back.
        kernels.sgd_update_(param._data, grad, lr)
        param._bump()  # an in-place change, like add_: graphs that saved param can tell
