"""Recurrent layers with PyTorch's arguments, parameter names, shapes, gate order and
initialisation, so that a state dict moves between the two: ``RNN``, ``LSTM``, ``GRU`` and
their cells.

Parameters ``weight_ih_l{k}`` (gates * hidden, input), ``weight_hh_l{k}`` (gates * hidden,
hidden), ``bias_ih_l{k}``, ``bias_hh_l{k}`` (gates * hidden,) per layer k (a cell's drop the
suffix); gates i, f, g, o for the LSTM, r, z, n for the GRU. Every one is initialised
U(-1/sqrt(hidden), 1/sqrt(hidden)). Constructors take ``rng=``, ``dtype=`` and ``device=``
as ``Linear`` does.

Inputs: (L, N, I), (N, L, I) with ``batch_first``, or unbatched (L, I); a leading task axis
(T, L, N, I) when run through ``functional_call`` with per-task parameters (T, ...). The
math and the task axis are in ``tinymeta.nn.functional_recurrent``.
"""

from __future__ import annotations

import math

from tinymeta._checks import check_bool, check_int
from tinymeta.nn import functional_recurrent as FR
from tinymeta.nn import init
from tinymeta.nn.layers import _empty
from tinymeta.nn.module import Module
from tinymeta.ops.shape import expand_dims, squeeze
from tinymeta.tensor import Tensor, as_input

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell"]


def _uniform_all(module: Module, hidden: int, rng) -> None:
    bound = 1.0 / math.sqrt(hidden) if hidden > 0 else 0.0
    for p in module.parameters():
        init.uniform_(p, -bound, bound, rng=rng)


class _RNNBase(Module):
    mode = ""  # "lstm", "gru", "rnn"
    gates = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dtype=None,
        device=None,
        rng=None,
    ):
        super().__init__()
        name = type(self).__name__
        self.input_size = check_int("input_size", input_size, name)
        self.hidden_size = check_int("hidden_size", hidden_size, name)
        self.num_layers = check_int("num_layers", num_layers, name)
        self.bias = check_bool("bias", bias, name)
        self.batch_first = check_bool("batch_first", batch_first, name)
        rows = self.gates * self.hidden_size
        for k in range(self.num_layers):
            n_in = self.input_size if k == 0 else self.hidden_size
            setattr(self, f"weight_ih_l{k}", _empty((rows, n_in), dtype, device))
            setattr(self, f"weight_hh_l{k}", _empty((rows, self.hidden_size), dtype, device))
            if self.bias:
                setattr(self, f"bias_ih_l{k}", _empty((rows,), dtype, device))
                setattr(self, f"bias_hh_l{k}", _empty((rows,), dtype, device))
        self.reset_parameters(rng)

    def reset_parameters(self, rng=None) -> None:
        _uniform_all(self, self.hidden_size, rng)

    def _weights(self) -> list:
        def get(name):
            return getattr(self, name) if self.bias or "weight" in name else None

        return [
            tuple(get(f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            for k in range(self.num_layers)
        ]

    def _unbatched(self, x: Tensor) -> bool:
        """Is x one unbatched sequence (L, I)? (A per-task weight means a task axis.)"""
        if not isinstance(x, Tensor) or x.ndim not in (2, 3, 4):
            shape = getattr(x, "shape", None)
            raise ValueError(
                f"{type(self).__name__}: expected an input (L, N, {self.input_size}) "
                f"({'N, L' if self.batch_first else 'L, N'} with batch_first={self.batch_first}), "
                f"(L, {self.input_size}) unbatched, or (T, ...) with a task axis; got {shape}"
            )
        return x.ndim == 2

    def _run(self, x, hx):
        raise NotImplementedError

    def forward(self, input, hx=None):  # noqa: A002 - PyTorch's argument name
        if not self._unbatched(input):
            return self._run(input, hx)
        # One sequence: a batch of one, states (num_layers, H) become (num_layers, 1, H).
        batch_axis = 0 if self.batch_first else 1
        x = expand_dims(input, batch_axis)
        if hx is not None:
            hx = tuple(expand_dims(h, 1) for h in hx) if self.mode == "lstm" else expand_dims(hx, 1)
        out, state = self._run(as_input(x, type(self).__name__, "input"), hx)
        out = squeeze(out, batch_axis)
        if self.mode == "lstm":
            return out, tuple(squeeze(s, 1) for s in state)
        return out, squeeze(state, 1)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        return s


class RNN(_RNNBase):
    """Elman RNN: h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), act tanh or relu.
    Returns (output (L, N, H), h_n (num_layers, N, H))."""

    mode = "rnn"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dtype=None,
        device=None,
        rng=None,
    ):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dtype, device, rng)
        self.nonlinearity = nonlinearity

    def _run(self, x, hx):
        return FR.rnn(x, hx, self._weights(), self.nonlinearity, self.batch_first)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + ", nonlinearity='relu'"


class LSTM(_RNNBase):
    """LSTM (gates i, f, g, o): c_t = f c_{t-1} + i g, h_t = o tanh(c_t). Called with
    (input, (h_0, c_0)) or (input,); returns (output (L, N, H), (h_n, c_n)), each
    (num_layers, N, H)."""

    mode = "lstm"
    gates = 4

    def _run(self, x, hx):
        return FR.lstm(x, hx, self._weights(), self.batch_first)


class GRU(_RNNBase):
    """GRU (gates r, z, n): n = tanh(W_in x + b_in + r (W_hn h + b_hn)),
    h_t = (1 - z) n + z h_{t-1}. Returns (output (L, N, H), h_n (num_layers, N, H))."""

    mode = "gru"
    gates = 3

    def _run(self, x, hx):
        return FR.gru(x, hx, self._weights(), self.batch_first)


class _CellBase(Module):
    gates = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        dtype=None,
        device=None,
        rng=None,
    ):
        super().__init__()
        name = type(self).__name__
        self.input_size = check_int("input_size", input_size, name)
        self.hidden_size = check_int("hidden_size", hidden_size, name)
        bias = check_bool("bias", bias, name)
        rows = self.gates * self.hidden_size
        self.weight_ih = _empty((rows, self.input_size), dtype, device)
        self.weight_hh = _empty((rows, self.hidden_size), dtype, device)
        for name in ("bias_ih", "bias_hh"):
            self.register_parameter(name, _empty((rows,), dtype, device) if bias else None)
        self.reset_parameters(rng)

    def reset_parameters(self, rng=None) -> None:
        _uniform_all(self, self.hidden_size, rng)

    def _params(self) -> tuple:
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    def forward(self, input, hx=None):  # noqa: A002 - PyTorch's argument name
        x = as_input(input, type(self).__name__, "input")
        if x.ndim != 1:
            return self._step(x, hx)
        # One example (I,): a batch of one, and the states (H,) likewise.
        hx = None if hx is None else self._map_state(hx, lambda h: expand_dims(h, 0))
        out = self._step(expand_dims(x, 0), hx)
        return self._map_state(out, lambda h: squeeze(h, 0))

    def _map_state(self, state, fn):
        return tuple(map(fn, state)) if isinstance(state, tuple) else fn(state)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        return s if self.bias_ih is not None else s + ", bias=False"


class RNNCell(_CellBase):
    """h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act tanh or relu."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        dtype=None,
        device=None,
        rng=None,
    ):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"RNNCell: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}"
            )
        super().__init__(input_size, hidden_size, bias, dtype, device, rng)
        self.nonlinearity = nonlinearity

    def _step(self, x, h):
        cell = FR.rnn_tanh_cell if self.nonlinearity == "tanh" else FR.rnn_relu_cell
        return cell(x, h, *self._params())


class LSTMCell(_CellBase):
    """One LSTM step: (h', c') from x (N, I) and (h, c) (N, H) (zeros when hx is None)."""

    gates = 4

    def _step(self, x, hx):
        return FR.lstm_cell(x, hx, *self._params())


class GRUCell(_CellBase):
    """One GRU step: h' from x (N, I) and h (N, H) (zeros when hx is None)."""

    gates = 3

    def _step(self, x, h):
        return FR.gru_cell(x, h, *self._params())
