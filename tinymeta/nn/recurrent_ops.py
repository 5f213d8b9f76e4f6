"""The fused ops of the recurrent cells and layers, and the one-node split and join of a
sequence.

A cell step (``F.lstm_cell``) is two nodes: ``GateProduct`` (gi + h @ W_hh^T: all four gates
from one matrix product, gi = x @ W_ih^T + b the input part) and ``LSTMPointwise`` (the gate
math, one kernel). A GRU step is a Linear (h @ W_hh^T + b_hh, apart because the reset gate
scales its n-part) and ``GRUPointwise``. A whole layer over a sequence is one node,
``LSTMLayer`` / ``GRULayer``: the input part of every step comes from one matrix product
beforehand, the forward loops over arrays, and the backward is backpropagation through time
written with the per-step ops, so it is differentiable again.

The pointwise backward passes are ``LSTMPointwiseGrad`` and ``GRUPointwiseGrad``: a kernel
forward (the first-order gradient in one pass) and a backward composed of differentiable ops
(the second derivatives written out below), so every order is available, as ``Tanh`` and
``TanhGrad`` do. Shapes: gate pre-activations (..., kH) in PyTorch's order (LSTM i, f, g, o;
GRU r, z, n), states (..., H); any leading axes (batch, task).
"""

from __future__ import annotations

import numpy as np

from tinymeta import grad_mode, kernels
from tinymeta.backend import get_array_module
from tinymeta.function import Function
from tinymeta.nn.functional_linear import Linear, LinearGradInput, LinearGradWeight, _matmul
from tinymeta.ops.elementwise import sigmoid, tanh
from tinymeta.ops.shape import concatenate, getitem, sum_to
from tinymeta.tensor import Tensor, constant


def _rows(a, width: int):
    """``a`` (..., width) as a C-contiguous (M, width) array for a kernel."""
    return a.reshape(-1, width)


def _chunks(x, k: int) -> list:
    """The k equal parts of x's last axis, as tensors (differentiable slices)."""
    size = x.shape[-1] // k
    return [getitem(x, (Ellipsis, slice(j * size, (j + 1) * size))) for j in range(k)]


def _join(parts):
    return concatenate(parts, axis=-1)


class GateProduct(Function):
    """y = gi + h @ w^T;  ggi = gy (summed to gi's shape), gh = gy @ w, gw = gy^T @ h.

    h (..., N, H) and w (kH, H) or per task (T, kH, H); gi (..., N, kH) is the input part of
    the gates. The two gradients of the product are Linear's own fused ops.

    ``cached``: the value of gi + h @ w^T, already computed from these same inputs (a layer's
    forward kept it), returned instead of a second matrix product.
    """

    def __init__(self, cached=None):
        self.cached = cached

    def forward(self, gi, h, w):
        if self.cached is not None:
            return self.cached
        y = _matmul(h, self.xp.swapaxes(w, -1, -2))
        if y.shape == gi.shape and y.dtype == gi.dtype:
            y += gi  # y is fresh: no second full-size temporary
            return y
        return y + gi

    def backward(self, gy):
        gi, h, w = self.inputs
        need_gi, need_h, need_w = self.needs_input_grad
        ggi = sum_to(gy, gi.shape) if need_gi else None
        gh = LinearGradInput.apply(gy, w, x_shape=h.shape) if need_h else None
        gw = None
        if need_w:
            gw = LinearGradWeight.apply(h, gy, w_shape=w.shape, with_bias=False)
        return ggi, gh, gw


class LSTMPointwise(Function):
    """i, f, o = sigmoid(a_i, a_f, a_o), g = tanh(a_g);  c' = f c + i g,  h' = o tanh(c').

    Outputs (h', c'); the gradient is ``LSTMPointwiseGrad`` (one kernel pass).
    """

    def forward(self, gates, c):
        h_new, c_new = kernels.lstm_pointwise_forward(
            _rows(gates, gates.shape[-1]), _rows(c, c.shape[-1])
        )
        return h_new.reshape(c.shape), c_new.reshape(c.shape)

    def backward(self, gh, gc):
        gates, c = self.inputs
        return LSTMPointwiseGrad.apply(gates, c, gh, gc)


class LSTMPointwiseGrad(Function):
    """(da, gc_prev) = the gradient of LSTMPointwise at (a, c) for (gh, gc):
    with t = tanh(c'), G = gc + gh o (1 - t^2):  da = (G g i', G c f', G i g', gh t o'),
    gc_prev = G f  (i' = i (1 - i), f', o' likewise, g' = 1 - g^2).

    Its own gradient, for cotangents U = (U_i, U_f, U_g, U_o) of da and V of gc_prev, is the
    gradient of S = <U, da> + <V, gc_prev> = G K + U_o gh t o' with
    K = U_i g i' + U_f c f' + U_g i g' + V f, and M = dS/dc' = gh (1 - t^2)(U_o o' - 2 t o K):

        dS/dgc = K                      dS/dgh = o (1 - t^2) K + U_o t o'
        dS/dc  = M f + G U_f f'
        dS/da_i = i' (G (U_g g' + U_i g (1 - 2i)) + M g)
        dS/da_f = f' (M c + G (V + U_f c (1 - 2f)))
        dS/da_g = g' (M i + G (U_i i' - 2 U_g i g))
        dS/da_o = o' gh (K (1 - t^2) + U_o t (1 - 2o))

    built from differentiable ops, so higher orders follow. ``out``: an array of gates' shape
    (a time step's rows of a layer's gradient buffer) that receives da.
    """

    def __init__(self, out=None):
        self.out = out

    def forward(self, gates, c, gh, gc):
        width, h_size = gates.shape[-1], c.shape[-1]
        out = None if self.out is None else _rows(self.out, width)
        da, dc = kernels.lstm_pointwise_backward(
            _rows(gates, width), _rows(c, h_size), _rows(gh, h_size), _rows(gc, h_size), out
        )
        return da.reshape(gates.shape), dc.reshape(c.shape)

    def backward(self, u, v):
        gates, c, gh, gc = self.inputs
        a_i, a_f, a_g, a_o = _chunks(gates, 4)
        u_i, u_f, u_g, u_o = _chunks(u, 4)
        i, f, g, o = sigmoid(a_i), sigmoid(a_f), tanh(a_g), sigmoid(a_o)
        di, df, dg, do = i * (1.0 - i), f * (1.0 - f), 1.0 - g * g, o * (1.0 - o)
        t = tanh(f * c + i * g)
        dt = 1.0 - t * t
        big_g = gc + gh * o * dt
        k = u_i * g * di + u_f * c * df + u_g * i * dg + v * f
        m = gh * dt * (u_o * do - 2.0 * t * o * k)
        need_a, need_c, need_gh, need_gc = self.needs_input_grad
        g_a = g_c = g_gh = None
        if need_a:
            g_a = _join(
                [
                    di * (big_g * (u_g * dg + u_i * g * (1.0 - 2.0 * i)) + m * g),
                    df * (m * c + big_g * (v + u_f * c * (1.0 - 2.0 * f))),
                    dg * (m * i + big_g * (u_i * di - 2.0 * u_g * i * g)),
                    do * gh * (k * dt + u_o * t * (1.0 - 2.0 * o)),
                ]
            )
        if need_c:
            g_c = m * f + big_g * u_f * df
        if need_gh:
            g_gh = o * dt * k + u_o * t * do
        return g_a, g_c, g_gh, (k if need_gc else None)


class GRUPointwise(Function):
    """r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), n = tanh(gi_n + r gh_n);
    h' = (1 - z) n + z h, with gi = x W_ih^T + b_ih and gh = h W_hh^T + b_hh.

    The gradient is ``GRUPointwiseGrad`` (one kernel pass).
    """

    def forward(self, gi, gh, h):
        h_size = h.shape[-1]
        w = gi.shape[-1]
        out = kernels.gru_pointwise_forward(_rows(gi, w), _rows(gh, w), _rows(h, h_size))
        return out.reshape(h.shape)

    def backward(self, gy):
        gi, gh, h = self.inputs
        return GRUPointwiseGrad.apply(gi, gh, h, gy)


class GRUPointwiseGrad(Function):
    """(dgi, dgh, dh) = the gradient of GRUPointwise at (gi, gh, h) for gy: with
    D = gy (1 - z)(1 - n^2),  dgi = (D gh_n r', gy (h - n) z', D),
    dgh = (D gh_n r', gy (h - n) z', D r),  dh = gy z  (r' = r (1 - r), z' likewise).

    Its own gradient, for cotangents A = dgi's, B = dgh's and V = dh's, is the gradient of
    S = D Q + U_z gy (h - n) z' + V gy z, with U_r = A_r + B_r, U_z = A_z + B_z,
    Q = U_r gh_n r' + A_n + B_n r and S_n = dS/d(gi_n) = -(2 n gy (1 - z) Q + U_z gy z')(1 - n^2):

        dS/dgy = (1 - z)(1 - n^2) Q + U_z (h - n) z' + V z        dS/dh = U_z gy z'
        dS/da_r = r' (D (B_n + U_r gh_n (1 - 2r)) + S_n gh_n)     (a_r = gi_r + gh_r)
        dS/da_z = z' gy (V - (1 - n^2) Q + U_z (h - n)(1 - 2z))   (a_z = gi_z + gh_z)
        dS/dgi_n = S_n                                             dS/dgh_n = D U_r r' + S_n r

    built from differentiable ops, so higher orders follow.
    """

    def forward(self, gi, gh, h, gy):
        w, h_size = gi.shape[-1], h.shape[-1]
        dgi, dgh, dh = kernels.gru_pointwise_backward(
            _rows(gi, w), _rows(gh, w), _rows(h, h_size), _rows(gy, h_size)
        )
        return dgi.reshape(gi.shape), dgh.reshape(gh.shape), dh.reshape(h.shape)

    def backward(self, a, b, v):
        gi, gh, h, gy = self.inputs
        gi_r, gi_z, gi_n = _chunks(gi, 3)
        gh_r, gh_z, gh_n = _chunks(gh, 3)
        a_r, a_z, a_n = _chunks(a, 3)
        b_r, b_z, b_n = _chunks(b, 3)
        r, z = sigmoid(gi_r + gh_r), sigmoid(gi_z + gh_z)
        n = tanh(gi_n + r * gh_n)
        dr, dz, dn = r * (1.0 - r), z * (1.0 - z), 1.0 - n * n
        u_r, u_z = a_r + b_r, a_z + b_z
        big_d = gy * (1.0 - z) * dn
        q = u_r * gh_n * dr + a_n + b_n * r
        s_n = -(2.0 * n * gy * (1.0 - z) * q + u_z * gy * dz) * dn
        s_r = dr * (big_d * (b_n + u_r * gh_n * (1.0 - 2.0 * r)) + s_n * gh_n)
        s_z = dz * gy * (v - dn * q + u_z * (h - n) * (1.0 - 2.0 * z))
        need_gi, need_gh, need_h, need_gy = self.needs_input_grad
        g_gi = _join([s_r, s_z, s_n]) if need_gi else None
        g_gh = _join([s_r, s_z, big_d * u_r * dr + s_n * r]) if need_gh else None
        g_h = u_z * gy * dz if need_h else None
        g_gy = dn * (1.0 - z) * q + u_z * (h - n) * dz + v * z if need_gy else None
        return g_gi, g_gh, g_h, g_gy


class Unbind(Function):
    """(y_0, ..., y_{L-1}) = the slices of x along ``axis``;  gx = Stack(gy_0, ..., gy_{L-1}).

    One node for the whole split of a sequence into time steps (a GetItem per step would
    scatter a full-size zero array per step in backward).
    """

    saves_inputs = False

    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, x):
        return tuple(self.xp.moveaxis(x, self.axis, 0))

    def backward(self, *gys):
        return Stack.apply(*gys, axis=self.axis)


class Stack(Function):
    """y = stack(xs, axis);  gx_k = Unbind(gy)_k.  One node for L time steps."""

    saves_inputs = False

    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, *xs):
        return self.xp.stack(xs, axis=self.axis)

    def backward(self, gy):
        parts = Unbind.apply(gy, axis=self.axis)
        return parts if isinstance(parts, tuple) else (parts,)


def unbind(x, axis: int = 0) -> tuple:
    """The slices of ``x`` along ``axis``, as one node."""
    axis = axis % x.ndim
    parts = Unbind.apply(x, axis=axis)
    return parts if isinstance(parts, tuple) else (parts,)


def stack(tensors, axis: int = 0):
    """Tensors of one shape joined along a new ``axis``, as one node."""
    tensors = list(tensors)
    shapes = {t.shape for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"stack: expected tensors of one shape, got {sorted(shapes)}")
    return Stack.apply(*tensors, axis=axis % (tensors[0].ndim + 1))


# --- whole layers -----------------------------------------------------------------------------


def _grad_enabled() -> bool:
    return grad_mode.is_grad_enabled()


class LSTMLayer(Function):
    """All L steps of one LSTM layer as one node: for t = 0..L-1,
    (h_t, c_t) = LSTMPointwise(gi_t + h_{t-1} W^T, c_{t-1}); output y = (h, c) stacked,
    shape (2, L, *B, H).

    gi (L, *B, 4H) is the input part of the gates (x W_ih^T + b_ih + b_hh for the whole
    sequence), h0, c0 (*B, H), W = w_hh (4H, H) or per task (T, 4H, H) with B = (T, N).

    The forward runs the loop on arrays (one matrix product into a preallocated gate buffer
    and one kernel per step) and keeps the gate pre-activations for the backward. The backward
    is backpropagation through time written with the per-step ops (LSTMPointwiseGrad, Linear's
    gradient ops) on tensors, so it is itself differentiable; the weight gradient is one
    matrix product over all steps; the kept gates enter it as GateProduct(gi_t, h_{t-1}, W)
    nodes (with the kept values: no second product), functions of the inputs. A backward that
    records nothing (no ``create_graph``) runs the same ops' forwards on arrays instead.
    """

    saves_output = True  # backward reads h and c from self.output

    def forward(self, gi, h0, c0, w):
        xp = self.xp
        steps, h_size = gi.shape[0], h0.shape[-1]
        width = gi.shape[-1]
        # W^T laid out for row-major reads: BLAS is faster on it than on a transposed view.
        wt = xp.ascontiguousarray(xp.swapaxes(w, -1, -2))
        self.gates = gates = xp.empty(gi.shape, dtype=gi.dtype)
        y = xp.empty((2,) + gi.shape[:-1] + (h_size,), dtype=gi.dtype)
        h, c = h0, c0
        for t in range(steps):
            g = gates[t]
            xp.matmul(h, wt, out=g)
            g += gi[t]
            h_new, c_new = kernels.lstm_pointwise_forward(
                g.reshape(-1, width), c.reshape(-1, h_size)
            )
            y[0, t] = h_new.reshape(h0.shape)
            y[1, t] = c_new.reshape(h0.shape)
            h, c = y[0, t], y[1, t]
        return y

    def backward(self, gy):
        if not _grad_enabled():
            return self._first_order_backward(gy)
        gi, h0, c0, w = self.inputs
        steps = gi.shape[0]
        hs, cs = unbind(self.output, 0)
        h_prev = [h0, *unbind(hs, 0)[:-1]]
        c_prev = [c0, *unbind(cs, 0)[:-1]]
        g_h, g_c = (unbind(g, 0) for g in unbind(gy, 0))
        gis = unbind(gi, 0)
        # The kept gates as functions of the inputs (no second product: see GateProduct).
        gates = [
            GateProduct.apply(gis[t], h_prev[t], w, cached=self.gates[t]) for t in range(steps)
        ]
        dgates = [None] * steps
        dh = dc = None
        for t in reversed(range(steps)):
            gh = g_h[t] if dh is None else g_h[t] + dh
            gc = g_c[t] if dc is None else g_c[t] + dc
            dgates[t], dc = LSTMPointwiseGrad.apply(gates[t], c_prev[t], gh, gc)
            dh = LinearGradInput.apply(dgates[t], w, x_shape=h_prev[t].shape)
        dg = stack(dgates, 0)
        g_w = None
        if self.needs_input_grad[3]:
            h_all = stack(h_prev, 0)
            g_w = LinearGradWeight.apply(h_all, dg, w_shape=w.shape, with_bias=False)
        return dg, dh, dc, g_w

    def _first_order_backward(self, gy):
        """The same steps on arrays, for a backward that records nothing: the ops' own
        forwards (LSTMPointwiseGrad's kernel, Linear's gradient products) called directly, the
        step gradients written into one buffer. Per step that skips four Function.apply calls
        and their tensors, about 15% of W5's fwd+bwd (docs/sequence-models.md)."""
        gi, h0, c0, w = (t.data for t in self.inputs)
        y, gy = self.output.data, gy.data
        steps = gi.shape[0]
        dg = self.xp.empty(gi.shape, dtype=gi.dtype)
        dh = dc = None
        for t in reversed(range(steps)):
            h_prev, c_prev = (h0, c0) if t == 0 else (y[0, t - 1], y[1, t - 1])
            gh = gy[0, t] if dh is None else gy[0, t] + dh
            gc = gy[1, t] if dc is None else gy[1, t] + dc
            _, dc = _run(LSTMPointwiseGrad(out=dg[t]), self.gates[t], c_prev, gh, gc)
            dh = _run(LinearGradInput(x_shape=h_prev.shape), dg[t], w)
        g_w = None
        if self.needs_input_grad[3]:
            # sum_t dg_t^T h_{t-1} over views: the first step's (h0) and the others' (rows of
            # the output), no copy of the states.
            grad_weight = LinearGradWeight(w_shape=w.shape, with_bias=False)
            g_w = _run(grad_weight, h0, dg[0])
            if steps > 1:
                g_w = g_w + _run(grad_weight, y[0, : steps - 1], dg[1:])
        return tuple(None if a is None else Tensor._wrap(a) for a in (dg, dh, dc, g_w))


def _run(fn: Function, *arrays):
    """An op's forward on arrays, outside the graph (its array module taken from them)."""
    if type(arrays[0]) is not np.ndarray:
        fn.xp = get_array_module(arrays[0])
    return fn.forward(*arrays)


class GRULayer(Function):
    """All L steps of one GRU layer as one node: h_t = GRUPointwise(gi_t, h_{t-1} W^T + b,
    h_{t-1}); output the h_t stacked, (L, *B, H).

    gi (L, *B, 3H) = x W_ih^T + b_ih for the whole sequence, h0 (*B, H), W = w_hh (3H, H) and
    b = b_hh (3H,) (optional), or both per task. Forward and backward as LSTMLayer's: the
    hidden products h_{t-1} W^T + b are kept for a first-order backward and recomputed with
    Linear under ``create_graph``.
    """

    saves_output = True

    def forward(self, gi, h0, w, b=None):
        xp = self.xp
        steps, width, h_size = gi.shape[0], gi.shape[-1], h0.shape[-1]
        wt = xp.ascontiguousarray(xp.swapaxes(w, -1, -2))
        self.hidden = hidden = xp.empty(gi.shape, dtype=gi.dtype)
        y = xp.empty(gi.shape[:-1] + (h_size,), dtype=gi.dtype)
        h = h0
        for t in range(steps):
            g = hidden[t]
            xp.matmul(h, wt, out=g)
            if b is not None:
                g += b if b.ndim == 1 else b[..., None, :]
            h_new = kernels.gru_pointwise_forward(
                gi[t].reshape(-1, width), g.reshape(-1, width), h.reshape(-1, h_size)
            )
            y[t] = h_new.reshape(h0.shape)
            h = y[t]
        return y

    def backward(self, gy):
        gi, h0, w = self.inputs[:3]
        b = self.inputs[3] if len(self.inputs) == 4 else None
        steps = gi.shape[0]
        h_prev = [h0, *unbind(self.output, 0)[:-1]]
        gis, g_h = unbind(gi, 0), unbind(gy, 0)
        if _grad_enabled():
            hidden = [Linear.apply(h, w) if b is None else Linear.apply(h, w, b) for h in h_prev]
        else:
            hidden = [constant(a) for a in self.hidden]
        dgi, dgh = [None] * steps, [None] * steps
        dh = None
        for t in reversed(range(steps)):
            g = g_h[t] if dh is None else g_h[t] + dh
            dgi[t], dgh[t], dh_direct = GRUPointwiseGrad.apply(gis[t], hidden[t], h_prev[t], g)
            dh = dh_direct + LinearGradInput.apply(dgh[t], w, x_shape=h_prev[t].shape)
        grads = [stack(dgi, 0), dh, None, None][: len(self.inputs)]
        if any(self.needs_input_grad[2:]):
            g_wb = LinearGradWeight.apply(
                stack(h_prev, 0), stack(dgh, 0), w_shape=w.shape, with_bias=b is not None
            )
            grads[2:] = g_wb if b is not None else (g_wb,)
        return tuple(grads)
