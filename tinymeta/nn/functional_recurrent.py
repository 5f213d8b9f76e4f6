"""Recurrent cells and layers as functions: ``F.lstm_cell``, ``F.gru_cell``, ``F.rnn_tanh_cell``,
``F.rnn_relu_cell`` and the multi-layer ``F.lstm``, ``F.gru``, ``F.rnn``.

PyTorch's layouts and gate orders: a cell's ``w_ih`` is (kH, I), ``w_hh`` (kH, H), biases
(kH,), with k = 4 for the LSTM (gates i, f, g, o), 3 for the GRU (r, z, n) and 1 for the
Elman RNN. Inputs are (N, I) for a cell and time-major (L, N, I) for a layer.

Task axis (task-vectorized MAML, ``functional_call`` with per-task parameters): weights
(T, kH, I) and biases (T, kH) take an input with a leading task axis, (T, N, I) for a cell and
(T, L, N, I) for a layer; states then carry it too ((T, N, H)). A shared weight next to a
per-task one broadcasts over the tasks.

A layer computes the input part of every gate for the whole sequence with one matrix product;
an LSTM or GRU layer then is one node (``LSTMLayer``, ``GRULayer``: one matrix product for all
gates and one kernel per step, see ``tinymeta.nn.recurrent_ops``); an Elman RNN layer is two
nodes per step (``GateProduct`` and tanh or relu).
"""

from __future__ import annotations

from tinymeta._checks import check_bool
from tinymeta.backend import get_array_module
from tinymeta.nn.functional_linear import linear
from tinymeta.nn.recurrent_ops import (
    GateProduct,
    GRULayer,
    GRUPointwise,
    LSTMLayer,
    LSTMPointwise,
    stack,
    unbind,
)
from tinymeta.ops.elementwise import relu, tanh
from tinymeta.ops.shape import broadcast_to, expand_dims, getitem, reshape, swapaxes
from tinymeta.tensor import Tensor, as_input, constant

__all__ = [
    "gru",
    "gru_cell",
    "lstm",
    "lstm_cell",
    "rnn",
    "rnn_relu_cell",
    "rnn_tanh_cell",
]

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _per_task(t: Tensor, tasks: int, ndim: int) -> Tensor:
    """``t`` with a leading task axis: as it is if it has one, else broadcast (differentiably)."""
    return t if t.ndim > ndim else broadcast_to(expand_dims(t, 0), (tasks,) + t.shape)


class _Weights:
    """One layer's (w_ih, w_hh, b_ih, b_hh), checked, with the number of tasks they carry."""

    def __init__(self, op: str, kind: str, w_ih, w_hh, b_ih, b_hh):
        k = _GATES[kind]
        self.w_ih, self.w_hh = as_input(w_ih, op, "w_ih"), as_input(w_hh, op, "w_hh")
        self.b_ih = None if b_ih is None else as_input(b_ih, op, "b_ih")
        self.b_hh = None if b_hh is None else as_input(b_hh, op, "b_hh")
        if self.w_hh.ndim not in (2, 3) or self.w_hh.shape[-2] != k * self.w_hh.shape[-1]:
            raise ValueError(
                f"{op}: w_hh must be ({k} * hidden, hidden), or (T, {k} * hidden, hidden) with a "
                f"task axis, got shape {self.w_hh.shape}"
            )
        self.hidden = self.w_hh.shape[-1]
        rows = k * self.hidden
        if self.w_ih.ndim not in (2, 3) or self.w_ih.shape[-2] != rows:
            raise ValueError(
                f"{op}: w_ih must be ({rows}, input), or (T, {rows}, input) with a task axis "
                f"(w_hh has shape {self.w_hh.shape}), got shape {self.w_ih.shape}"
            )
        self.input_size = self.w_ih.shape[-1]
        tasks = {t.shape[0] for t in (self.w_ih, self.w_hh) if t.ndim == 3}
        for name, b in (("b_ih", self.b_ih), ("b_hh", self.b_hh)):
            if b is None:
                continue
            if b.ndim not in (1, 2) or b.shape[-1] != rows:
                raise ValueError(
                    f"{op}: {name} must have shape ({rows},), or (T, {rows}) with a task axis, "
                    f"got {b.shape}"
                )
            if b.ndim == 2:
                tasks.add(b.shape[0])
        if len(tasks) > 1:
            raise ValueError(f"{op}: the weights and biases disagree on the number of tasks")
        self.tasks = tasks.pop() if tasks else None

    def check_input(self, op: str, x: Tensor, batch_ndim: int) -> None:
        """x must be (..., input) with ``batch_ndim`` axes before the features, plus a leading
        task axis exactly when the weights carry one."""
        want = batch_ndim + 1 + (self.tasks is not None)
        layout = ("T, " if self.tasks is not None else "") + ("L, " if batch_ndim == 2 else "")
        if x.ndim != want or x.shape[-1] != self.input_size:
            raise ValueError(
                f"{op}: expected an input of shape ({layout}N, {self.input_size}) for weights "
                f"w_ih {self.w_ih.shape}, got {x.shape}"
            )
        if self.tasks is not None and x.shape[0] != self.tasks:
            raise ValueError(
                f"{op}: the input has {x.shape[0]} tasks (shape {x.shape}) but the weights "
                f"have {self.tasks}"
            )

    def input_part(self, x: Tensor, bias):
        """x @ w_ih^T + bias for x (..., I): one matrix product for every gate and step."""
        if self.tasks is None:
            return linear(x, self.w_ih, bias)
        w, bias = _matched(self.w_ih, bias, self.tasks)
        flat = reshape(x, (x.shape[0], -1, x.shape[-1]))  # (T, ..., I) as (T, M, I)
        return reshape(linear(flat, w, bias), x.shape[:-1] + (w.shape[-2],))

    def hidden_part(self, h: Tensor):
        """h @ w_hh^T + b_hh (the GRU's, whose n-part the reset gate scales)."""
        if self.tasks is None:
            return linear(h, self.w_hh, self.b_hh)
        return linear(h, *_matched(self.w_hh, self.b_hh, self.tasks))

    def summed_bias(self):
        """b_ih + b_hh (both add to every gate of an LSTM or Elman RNN), or None."""
        if self.b_ih is None:
            return self.b_hh
        return self.b_ih if self.b_hh is None else self.b_ih + self.b_hh


def _matched(w: Tensor, b, tasks: int) -> tuple:
    """w and b both with the task axis when either has it (``linear`` pairs them row by row)."""
    if b is None or (w.ndim == 3) == (b.ndim == 2):
        return w, b
    return _per_task(w, tasks, 2), _per_task(b, tasks, 1)


def _state(op: str, name: str, h, shape: tuple, like: Tensor) -> Tensor:
    """The initial state ``h`` (zeros if None) checked and broadcast to ``shape``."""
    if h is None:
        xp = get_array_module(like.data)
        return constant(xp.zeros(shape, dtype=like.dtype))
    h = as_input(h, op, name)
    if h.shape == shape:
        return h
    if h.shape != shape[1:]:  # a state without the task axis is shared by the tasks
        raise ValueError(f"{op}: {name} must have shape {shape}, got {h.shape}")
    return broadcast_to(expand_dims(h, 0), shape)


# --- cells --------------------------------------------------------------------------------


def lstm_cell(x, hx=None, w_ih=None, w_hh=None, b_ih=None, b_hh=None) -> tuple:
    """(h', c') = one LSTM step: gates = x W_ih^T + b_ih + h W_hh^T + b_hh in the order i, f,
    g, o; c' = sigmoid(f) c + sigmoid(i) tanh(g), h' = sigmoid(o) tanh(c').

    x (N, I), hx = (h, c) each (N, H) or None (zeros); a task axis as in the module docstring.
    """
    return _lstm_step("lstm_cell", x, hx, _Weights("lstm_cell", "lstm", w_ih, w_hh, b_ih, b_hh))


def _lstm_step(op, x, hx, weights: _Weights) -> tuple:
    x = as_input(x, op, "input")
    weights.check_input(op, x, 1)
    shape = x.shape[:-1] + (weights.hidden,)
    h, c = (None, None) if hx is None else hx
    h, c = _state(op, "h", h, shape, x), _state(op, "c", c, shape, x)
    gi = weights.input_part(x, weights.summed_bias())
    gates = GateProduct.apply(gi, h, weights.w_hh)
    return LSTMPointwise.apply(gates, c)


def gru_cell(x, h=None, w_ih=None, w_hh=None, b_ih=None, b_hh=None) -> Tensor:
    """h' = (1 - z) n + z h with r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr), z likewise,
    n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn)) (PyTorch's GRU; gates r, z, n)."""
    op = "gru_cell"
    weights = _Weights(op, "gru", w_ih, w_hh, b_ih, b_hh)
    x = as_input(x, op, "input")
    weights.check_input(op, x, 1)
    h = _state(op, "h", h, x.shape[:-1] + (weights.hidden,), x)
    gi = weights.input_part(x, weights.b_ih)
    return _gru_step(gi, h, weights)


def _gru_step(gi, h, weights: _Weights):
    gh = weights.hidden_part(h)
    return GRUPointwise.apply(gi, gh, h)


def rnn_tanh_cell(x, h=None, w_ih=None, w_hh=None, b_ih=None, b_hh=None) -> Tensor:
    """h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)."""
    return _rnn_cell("rnn_tanh_cell", "rnn_tanh", x, h, w_ih, w_hh, b_ih, b_hh)


def rnn_relu_cell(x, h=None, w_ih=None, w_hh=None, b_ih=None, b_hh=None) -> Tensor:
    """h' = relu(x W_ih^T + b_ih + h W_hh^T + b_hh)."""
    return _rnn_cell("rnn_relu_cell", "rnn_relu", x, h, w_ih, w_hh, b_ih, b_hh)


def _rnn_cell(op, kind, x, h, w_ih, w_hh, b_ih, b_hh):
    weights = _Weights(op, kind, w_ih, w_hh, b_ih, b_hh)
    x = as_input(x, op, "input")
    weights.check_input(op, x, 1)
    h = _state(op, "h", h, x.shape[:-1] + (weights.hidden,), x)
    gi = weights.input_part(x, weights.summed_bias())
    act = tanh if kind == "rnn_tanh" else relu
    return act(GateProduct.apply(gi, h, weights.w_hh))


# --- layers ---------------------------------------------------------------------------------


def _layers(op: str, kind: str, weights) -> list:
    if not weights:
        raise ValueError(f"{op}: expected one (w_ih, w_hh, b_ih, b_hh) tuple per layer, got none")
    out = []
    for k, layer in enumerate(weights):
        if len(layer) != 4:
            raise ValueError(
                f"{op}: layer {k} must be a (w_ih, w_hh, b_ih, b_hh) tuple (biases may be "
                f"None), got {len(layer)} items"
            )
        out.append(_Weights(f"{op} (layer {k})", kind, *layer))
    return out


def _prepare(op: str, x, layers: list, batch_first: bool):
    """x as a time-major tensor (T..., L, N, I) and the shape of one layer's state."""
    x = as_input(x, op, "input")
    layers[0].check_input(op, x, 2)
    if check_bool("batch_first", batch_first, op):  # (T..., N, L, I) -> (T..., L, N, I)
        x = x.swapaxes(-3, -2)
    return x


def _layer_states(op: str, name: str, h, num_layers: int, x: Tensor, hidden: int) -> list:
    """Per-layer initial states (T..., N, H) from h (T..., num_layers, N, H) or None."""
    lead, n = x.shape[:-3], x.shape[-2]
    if h is None:
        return [None] * num_layers
    h = as_input(h, op, name)
    shape = lead + (num_layers, n, hidden)
    if h.shape != shape and h.shape != shape[1:]:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {h.shape}")
    axis = h.ndim - 3
    return list(unbind(h, axis))


def _time_first(x: Tensor) -> Tensor:
    """(T, L, ...) <-> (L, T, ...) for an input with a task axis (4-D); others as they are.
    The layer ops run time-major with any batch axes after the time axis."""
    return swapaxes(x, 0, 1) if x.ndim == 4 else x


def lstm(x, hx, weights, batch_first: bool = False) -> tuple:
    """A multi-layer LSTM over a sequence: returns (output, (h_n, c_n)).

    x (L, N, I) (or (N, L, I) with ``batch_first``), a task axis in front where the weights
    have one; hx = (h_0, c_0) each (num_layers, N, H), or None for zeros; ``weights`` holds
    one (w_ih, w_hh, b_ih, b_hh) per layer. output (L, N, H) (batch-first if the input is)
    holds the last layer's h at every step; h_n and c_n (num_layers, N, H) the last step's.
    """
    op = "lstm"
    layers = _layers(op, "lstm", weights)
    x = _prepare(op, x, layers, batch_first)
    h0, c0 = (None, None) if hx is None else hx
    hidden = layers[0].hidden
    hs0 = _layer_states(op, "h_0", h0, len(layers), x, hidden)
    cs0 = _layer_states(op, "c_0", c0, len(layers), x, hidden)
    h_n, c_n = [], []
    for k, layer in enumerate(layers):
        if k:
            layer.check_input(f"{op} (layer {k})", x, 2)
        gi = _time_first(layer.input_part(x, layer.summed_bias()))
        shape = gi.shape[1:-1] + (layer.hidden,)
        h = _state(op, "h_0", hs0[k], shape, x)
        c = _state(op, "c_0", cs0[k], shape, x)
        hs, cs = unbind(LSTMLayer.apply(gi, h, c, layer.w_hh), 0)
        h_n.append(getitem(hs, -1))
        c_n.append(getitem(cs, -1))
        x = _time_first(hs)  # back to x's layout (the swap is its own inverse)
    output = x.swapaxes(-3, -2) if batch_first else x
    axis = h_n[0].ndim - 2
    return output, (stack(h_n, axis), stack(c_n, axis))


def gru(x, hx, weights, batch_first: bool = False) -> tuple:
    """A multi-layer GRU over a sequence: returns (output, h_n); arguments as ``lstm``'s
    with hx = h_0 (num_layers, N, H) or None."""
    op = "gru"
    layers = _layers(op, "gru", weights)
    x = _prepare(op, x, layers, batch_first)
    hs0 = _layer_states(op, "h_0", hx, len(layers), x, layers[0].hidden)
    h_n = []
    for k, layer in enumerate(layers):
        if k:
            layer.check_input(f"{op} (layer {k})", x, 2)
        gi = _time_first(layer.input_part(x, layer.b_ih))
        h = _state(op, "h_0", hs0[k], gi.shape[1:-1] + (layer.hidden,), x)
        w, b = layer.w_hh, layer.b_hh
        if layer.tasks is not None:
            w, b = _matched(w, b, layer.tasks)
        hs = GRULayer.apply(gi, h, w) if b is None else GRULayer.apply(gi, h, w, b)
        h_n.append(getitem(hs, -1))
        x = _time_first(hs)
    output = x.swapaxes(-3, -2) if batch_first else x
    return output, stack(h_n, h_n[0].ndim - 2)


def rnn(x, hx, weights, nonlinearity: str = "tanh", batch_first: bool = False) -> tuple:
    """A multi-layer Elman RNN, h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh) with act tanh or
    relu: returns (output, h_n); arguments as ``gru``'s."""
    op = "rnn"
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"{op}: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    layers = _layers(op, "rnn_" + nonlinearity, weights)
    act = tanh if nonlinearity == "tanh" else relu
    x = _prepare(op, x, layers, batch_first)
    hs0 = _layer_states(op, "h_0", hx, len(layers), x, layers[0].hidden)
    h_n = []
    for k, layer in enumerate(layers):
        if k:
            layer.check_input(f"{op} (layer {k})", x, 2)
        steps = unbind(layer.input_part(x, layer.summed_bias()), x.ndim - 3)
        h = _state(op, "h_0", hs0[k], steps[0].shape[:-1] + (layer.hidden,), x)
        w_hh = layer.w_hh
        outputs = []
        for gi in steps:
            h = act(GateProduct.apply(gi, h, w_hh))
            outputs.append(h)
        x = stack(outputs, x.ndim - 3)
        h_n.append(h)
    output = x.swapaxes(-3, -2) if batch_first else x
    return output, stack(h_n, h_n[0].ndim - 2)
