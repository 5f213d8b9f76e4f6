"""The linear layer as three fused ops: Linear (y = x @ w^T + b) and its two gradients.

Its own module, below ``tinymeta.nn.functional`` (which re-exports ``linear``): the
recurrent and attention layers build on it without importing ``functional``.
"""

from __future__ import annotations

import math

from tinymeta import kernels
from tinymeta.function import Function, arrays_only_on_host
from tinymeta.ops.shape import sum_to_array
from tinymeta.tensor import Tensor, as_input


class Linear(Function):
    """y = x @ w^T + b;  gx = gy @ w, gw = gy^T @ x (summed over shared axes), gb = sum(gy).

    ``w`` may carry leading batch axes (B..., out, in), with ``b`` (B..., out):
    each batch element then has its own weights (matmul broadcasting).

    The gradients are two fused ops, LinearGradInput (gx) and LinearGradWeight (gw, gb),
    whose own gradients are Linear and these two again: a double backward through a
    layer is a handful of nodes instead of a chain of matmuls, transposes and reshapes.
    """

    def forward(self, x, w, b=None):
        return _linear_array(x, w, b)

    def backward(self, gy):
        x, w = self.inputs[:2]
        has_bias = len(self.inputs) == 3
        gx = _input_grad(gy, w, x.shape) if self.needs_input_grad[0] else None
        if not any(self.needs_input_grad[1:]):
            return (gx, None, None) if has_bias else (gx, None)
        gw = _weight_grad(x, gy, w.shape, has_bias)
        return (gx, *gw) if has_bias else (gx, gw)


class LinearGradInput(Function):
    """gx = gy @ w (summed to x's shape);  ggy = linear(ggx, w), gw = LinearGradWeight(ggx, gy).

    The backward of Linear with respect to its input. It is linear in gy and in w, so its
    own gradients are again a Linear (for gy) and a weight gradient (for w).
    """

    def __init__(self, x_shape: tuple):
        self.x_shape = tuple(x_shape)

    def forward(self, gy, w):
        return _input_grad_array(gy, w, self.x_shape)

    def backward(self, ggx):
        gy, w = self.inputs
        ggy = _linear(ggx, w, None) if self.needs_input_grad[0] else None
        gw = _weight_grad(ggx, gy, w.shape, False) if self.needs_input_grad[1] else None
        return ggy, gw


class LinearGradWeight(Function):
    """gw = gy^T @ x (summed to w's shape), and with_bias gb = sum of gy over rows;
    gx = LinearGradInput(gy, ggw), ggy = linear(x, ggw, ggb).

    The backward of Linear with respect to its weight and bias: outputs (gw, gb) when
    ``with_bias``, else gw. Linear in x and in gy, so its gradients are a Linear again
    (for gy: x @ ggw^T + ggb) and an input gradient (for x: gy @ ggw).
    """

    def __init__(self, w_shape: tuple, with_bias: bool):
        self.w_shape, self.with_bias = tuple(w_shape), with_bias

    keeps_output_specs = False  # see output_specs

    def forward(self, x, gy):
        grads = _weight_grad_arrays(x, gy, self.w_shape, self.with_bias)
        if self.with_bias:  # (dtypes are shared objects: kept without a tuple per node)
            self.gw_dtype, self.gb_dtype = grads[0].dtype, grads[1].dtype
        return grads

    @property
    def output_specs(self):
        """((shape, dtype) of gw, of gb): what Function._record keeps for other ops."""
        return ((self.w_shape, self.gw_dtype), (self.w_shape[:-1], self.gb_dtype))

    def backward(self, ggw, ggb=None):
        x, gy = self.inputs
        gx = _input_grad(gy, ggw, x.shape) if self.needs_input_grad[0] else None
        ggy = _linear(x, ggw, ggb if self.with_bias else None) if self.needs_input_grad[1] else None
        return gx, ggy


# --- the arrays: the forwards above, and the backward rules where nothing records ------------


def _linear_array(x, w, b):
    y = _matmul(x, w.swapaxes(-1, -2))  # the method: np.swapaxes adds a Python wrapper
    if b is not None:
        if b.ndim > 1:  # batched bias (B..., out): one row per batch element
            b = b[..., None, :]
        if b.dtype == y.dtype:
            y += b  # y is a fresh array, and b's axes are all among y's: add in place
        else:
            y = y + b
    return y


def _input_grad_array(gy, w, x_shape: tuple):
    return sum_to_array(None, _matmul(gy, w), x_shape)


def _weight_grad_arrays(x, gy, w_shape: tuple, with_bias: bool):
    out, n_in = w_shape[-2:]
    if len(w_shape) == 2:  # one weight shared by every row: fold all leading axes
        rows = math.prod(gy.shape[:-1])  # not -1: that fails on an empty axis
        gy2 = gy.reshape(rows, out)  # into one GEMM (its result is laid out like w)
        gw = _matmul(gy2.T, x.reshape(rows, n_in))
        gb = gy2.sum(axis=0)
    else:  # per-batch-element weights: a batched GEMM, summed over broadcast axes
        gw = sum_to_array(None, _matmul(gy.swapaxes(-1, -2), x), w_shape)
        gb = sum_to_array(None, gy.sum(axis=-2), w_shape[:-1])
    return (gw, gb) if with_bias else gw


# The backward rules apply these ops, recorded when the backward is (create_graph). Where
# nothing would record (function.arrays_only_on_host: the last backward of a MAML step, about
# half of its op applications) they call the forwards' array functions themselves: the same
# array calls without a Function, its keyword parameters and Function.apply's dispatch.


def _linear(x, w, b):
    """Linear.apply(x, w[, b])."""
    if b is None:
        if arrays_only_on_host(x, w):
            return Tensor._wrap(_linear_array(x._data, w._data, None))
        return Linear.apply(x, w)
    if arrays_only_on_host(x, w, b):
        return Tensor._wrap(_linear_array(x._data, w._data, b._data))
    return Linear.apply(x, w, b)


def _input_grad(gy, w, x_shape: tuple):
    """LinearGradInput.apply(gy, w, x_shape=x_shape)."""
    if arrays_only_on_host(gy, w):
        return Tensor._wrap(_input_grad_array(gy._data, w._data, x_shape))
    return LinearGradInput.apply(gy, w, x_shape=x_shape)


def _weight_grad(x, gy, w_shape: tuple, with_bias: bool):
    """LinearGradWeight.apply(x, gy, w_shape=w_shape, with_bias=with_bias): gw, or (gw, gb)."""
    if arrays_only_on_host(x, gy):
        grads = _weight_grad_arrays(x._data, gy._data, w_shape, with_bias)
        if with_bias:
            return Tensor._wrap(grads[0]), Tensor._wrap(grads[1])
        return Tensor._wrap(grads)
    return LinearGradWeight.apply(x, gy, w_shape=w_shape, with_bias=with_bias)


def _matmul(a, b):
    """a @ b. An inner size of 1 (a layer with one input feature, the gradients of a layer
    with one output) makes it an outer product: one broadcast multiply is then about twice
    as fast as a BLAS call per batch element, with the same numbers (there is no sum)."""
    if a.ndim >= 2 and b.ndim >= 2 and a.shape[-1] == 1 == b.shape[-2]:
        return a * b
    return kernels.matmul(a, b)  # NumPy: a @ b; CuPy: a kernel a CUDA graph can hold, or cuBLAS


def linear(x, w, b=None) -> Tensor:
    """y = x @ w^T + b, with w of shape (out, in) and x of shape (..., in).

    Batched weights: w of shape (B..., out, in) and b of shape (B..., out) apply
    batch element k's weights to x[k] of shape (N, in) (x is (B..., N, in), its
    batch axes broadcast). This is how a model runs with per-task parameters in
    task-vectorized MAML (``functional_call`` with a leading task axis).
    """
    # (isinstance first, and the arrays' shapes: a layer runs this at every forward)
    x = x if isinstance(x, Tensor) else as_input(x, "linear", "x")
    w = w if isinstance(w, Tensor) else as_input(w, "linear", "w")
    x_shape, w_shape = x._data.shape, w._data.shape
    if len(w_shape) < 2:
        raise ValueError(
            f"linear: weight must be (out, in) or (B..., out, in), got shape {w_shape}"
        )
    if not x_shape or x_shape[-1] != w_shape[-1]:
        raise ValueError(
            f"linear: input of shape {x_shape} has {x_shape[-1] if x_shape else 0} features "
            f"but the weight (shape {w_shape}) expects {w_shape[-1]}"
        )
    if len(w_shape) > 2 and len(x_shape) < 2:
        raise ValueError(
            f"linear: batched weights of shape {w_shape} need an input of shape (B..., N, in), "
            f"got {x_shape}"
        )
    if b is None:
        return Linear.apply(x, w)
    b = b if isinstance(b, Tensor) else as_input(b, "linear", "b")
    if b._data.shape != w_shape[:-1]:
        raise ValueError(f"linear: bias must have shape {w_shape[:-1]}, got {b.shape}")
    return Linear.apply(x, w, b)
