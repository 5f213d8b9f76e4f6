"""The LSTM optimizer of Andrychowicz et al. 2016 ("Learning to learn by gradient descent by
gradient descent"): a two-layer LSTM, shared by all coordinates, maps each coordinate's
gradient to its update.

Each coordinate of each parameter is one row of a batch: the LSTM's state (h, c) per layer
and coordinate lives in the inner loop's ``state`` dict, the weights are shared. The gradient
enters preprocessed as in the paper's appendix A (p = 10):

    (log|g| / p, sign(g))   if |g| >= exp(-p)
    (-1, exp(p) g)          otherwise

which gives the network inputs of one scale whatever the gradient's magnitude. The update is
``output_scale`` (0.1 in the paper) times a linear read-out of the top layer's h; the
parameter moves by it: p' = p + update.

Everything is tinymeta ops (``F.lstm_cell``: the fused gate product and gate kernel), so the
update is differentiable in the LSTM's weights and in the gradient: as MAML's inner rule it
takes part in second-order meta-gradients, and meta-training it is backpropagation through
the unrolled optimisation (truncate by starting a new graph from detached parameters and
states; see examples/lstm_optimizer_quadratic.py).
"""

from __future__ import annotations

import math

import numpy as np

from tinymeta import ops
from tinymeta._checks import check_int, check_positive
from tinymeta.backend import get_array_module
from tinymeta.creation import tensor
from tinymeta.nn.functional_recurrent import lstm_cell
from tinymeta.tensor import Tensor, constant

__all__ = ["LSTMOptimizer", "preprocess_gradient"]


def preprocess_gradient(g: Tensor, p: float = 10.0) -> Tensor:
    """The paper's two input features per coordinate, shape g.shape + (2,).

    Both branches are computed from clipped values (|g| at least exp(-p) inside the log), so
    the branch not taken never produces an infinite or NaN gradient.
    """
    small = math.exp(-p)
    magnitude = ops.abs(g)
    big = magnitude.data >= small
    log_part = ops.log(ops.maximum(magnitude, small)) * (1.0 / p)
    xp = get_array_module(g.data)
    first = ops.where(big, log_part, constant(xp.full(g.shape, -1.0, dtype=g.dtype)))
    second = ops.where(big, constant(xp.sign(g.data)), math.exp(p) * g)
    return ops.stack([first, second], axis=-1)


class LSTMOptimizer:
    """p' = p + output_scale * W_out h_2, (h_k, c_k) = LSTM layer k per coordinate, fed the
    preprocessed gradient; ``hidden`` units (20 in the paper) per layer, ``layers`` layers.

    Usable wherever an inner rule is (``meta.adapt``, ``meta.maml_loss``): its state (the
    LSTM's (h, c) per parameter and layer) lives in the inner loop's ``state`` dict, and
    ``parameters()`` are its weights for the outer optimizer.
    """

    def __init__(
        self,
        hidden: int = 20,
        layers: int = 2,
        output_scale: float = 0.1,
        preprocess: float = 10.0,
        rng=None,
        dtype=None,
        device=None,
    ):
        self.hidden = check_int("hidden", hidden, "LSTMOptimizer", low=1)
        self.layers = check_int("layers", layers, "LSTMOptimizer", low=1)
        self.output_scale = float(output_scale)
        self.preprocess = check_positive("preprocess", preprocess, "LSTMOptimizer")
        dtype = np.float32 if dtype is None else dtype
        rng = np.random.default_rng(rng)
        bound = 1.0 / math.sqrt(self.hidden)  # PyTorch's LSTM initialisation
        values = {}
        for k in range(self.layers):
            n_in = 2 if k == 0 else self.hidden
            values[f"weight_ih_l{k}"] = rng.uniform(-bound, bound, (4 * self.hidden, n_in))
            values[f"weight_hh_l{k}"] = rng.uniform(-bound, bound, (4 * self.hidden, self.hidden))
            values[f"bias_ih_l{k}"] = rng.uniform(-bound, bound, 4 * self.hidden)
            values[f"bias_hh_l{k}"] = rng.uniform(-bound, bound, 4 * self.hidden)
        values["out.weight"] = rng.uniform(-bound, bound, (1, self.hidden))
        values["out.bias"] = np.zeros(1)
        self.weights = {}
        for name, v in values.items():
            w = tensor(v, dtype=dtype, device=device, requires_grad=True)
            w.name = f"lstm_opt.{name}"
            self.weights[name] = w

    def update(self, g: Tensor, state: tuple | None) -> tuple:
        """(update, new state) for a gradient ``g`` of any shape; ``state`` is the previous
        ((h, c) per layer) of its coordinates, None at the first step."""
        w = self.weights
        x = ops.reshape(preprocess_gradient(g, self.preprocess), (-1, 2))
        new_state = []
        for k in range(self.layers):
            hc = None if state is None else state[k]
            h, c = lstm_cell(
                x, hc, w[f"weight_ih_l{k}"], w[f"weight_hh_l{k}"], w[f"bias_ih_l{k}"],
                w[f"bias_hh_l{k}"],
            )  # fmt: skip
            new_state.append((h, c))
            x = h
        out = ops.matmul(x, ops.transpose(w["out.weight"])) + w["out.bias"]
        return ops.reshape(out, g.shape) * self.output_scale, tuple(new_state)

    def __call__(self, params: dict, grads: dict, step: int, state: dict) -> dict:
        new = {}
        for k, g in grads.items():
            step_update, state[k] = self.update(g, state.get(k))
            new[k] = params[k] + step_update
        return new

    def parameters(self) -> list:
        return list(self.weights.values())

    def named_parameters(self) -> dict:
        return {f"lstm_opt.{k}": v for k, v in self.weights.items()}
