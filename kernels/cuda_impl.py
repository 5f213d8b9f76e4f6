"""CUDA kernels behind ``tinymeta.kernels`` for CuPy arrays (the sources: kernels/cuda/*.cu).

Each function has the signature and results of its twin in ``reference.py``. It allocates
its outputs with the array module of its inputs (CuPy on a GPU; NumPy when the test suite
emulates the kernels on the CPU, tests/cuda_emulator.py), brings the inputs to the
C-contiguous layout the kernel reads, and launches it through ``cuda_launch.CudaSource``.

Layouts: elementwise kernels run on flat views in the arrays' memory order, so channels-last
activations need no copy; the pooling and window kernels read and write (N, H, W, C) arrays,
the channels-last memory of tinymeta's NCHW tensors, and return NCHW views of them, as
``numba_impl`` does. Inputs in other layouts are copied once.
"""

from __future__ import annotations

import numpy as np

from . import reference
from .cuda_launch import CudaSource

_ELEMENTWISE = CudaSource(
    "elementwise.cu", ("relu_forward", "relu_backward", "sgd_update", "adam_update")
)

_POOLING = CudaSource("pooling.cu", ("maxpool2d_argmax", "maxpool2d_scatter", "maxpool2d_gather"))

_WINDOWS = CudaSource("windows.cu", ("im2col", "col2im"))

_SOFTMAX_XENT = CudaSource("softmax_xent.cu", ("softmax_xent_forward", "softmax_xent_backward"))

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _count(n) -> np.int64:
    """A size or index as the kernels' ``long long``."""
    return np.int64(n)


# --- layouts ----------------------------------------------------------------------------------


def _memory_order(a) -> tuple:
    """a's axes from the slowest- to the fastest-varying in memory."""
    return tuple(sorted(range(a.ndim), key=lambda axis: -a.strides[axis]))


def _dense_order(a) -> tuple:
    """The axis order in which ``a`` is C-contiguous (its memory order), or C order when
    ``a`` is not dense (a slice, a broadcast)."""
    order = _memory_order(a)
    return order if a.transpose(order).flags.c_contiguous else tuple(range(a.ndim))


def _flat(a, order):
    """a's elements in the axis order ``order``, as a C-contiguous 1-D array (a view when a
    is dense in that order, else a copy)."""
    xp = reference._array_module(a)
    return xp.ascontiguousarray(a.transpose(order)).reshape(-1)


def _flat_in_place(a, order):
    """A 1-D view of ``a`` in the axis order ``order``, or None where a is not dense in it."""
    view = a.transpose(order)
    return view.reshape(-1) if view.flags.c_contiguous else None


def _empty_in_order(a, order):
    """An uninitialised array shaped like ``a``, laid out in memory in the axis order
    ``order``, and its flat view."""
    xp = reference._array_module(a)
    out = xp.empty([a.shape[axis] for axis in order], a.dtype)
    return out.transpose(tuple(np.argsort(order).tolist())), out.reshape(-1)


def _one_float_dtype(*arrays) -> bool:
    return arrays[0].dtype in _FLOATS and all(a.dtype == arrays[0].dtype for a in arrays)


# --- elementwise steps of a training loop -----------------------------------------------------
# Other dtypes (float16, integers) and mixed dtypes take the reference.


def relu_forward(x):
    """See ``reference.relu_forward``: y in x's dtype and memory layout."""
    if not _one_float_dtype(x):
        return reference.relu_forward(x)
    order = _dense_order(x)
    y, y_flat = _empty_in_order(x, order)
    _ELEMENTWISE.launch("relu_forward", x.dtype, x.size, (_flat(x, order), y_flat, _count(x.size)))
    return y


def relu_backward(gy, x):
    """See ``reference.relu_backward``: gx in gy's dtype and memory layout."""
    if not _one_float_dtype(gy, x):
        return reference.relu_backward(gy, x)
    order = _dense_order(gy)
    gx, gx_flat = _empty_in_order(gy, order)
    args = (_flat(gy, order), _flat(x, order), gx_flat, _count(gy.size))
    _ELEMENTWISE.launch("relu_backward", gy.dtype, gy.size, args)
    return gx


def sgd_update_(param, grad, lr: float):
    """See ``reference.sgd_update_``: param -= lr * grad in place, lr rounded to param's dtype."""
    order = _memory_order(param)
    param_flat = _flat_in_place(param, order)
    if param_flat is None or not _one_float_dtype(param, grad):
        return reference.sgd_update_(param, grad, lr)
    lr = param.dtype.type(lr)
    args = (param_flat, _flat(grad, order), lr, _count(param.size))
    _ELEMENTWISE.launch("sgd_update", param.dtype, param.size, args)
    return param


def adam_update_(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    bias_correction2_sqrt: float,
    weight_decay: float = 0.0,
    param_decay: float = 1.0,
):
    """See ``reference.adam_update_``: the same arithmetic, one pass over memory."""
    amsgrad = max_exp_avg_sq is not None
    written = (param, exp_avg, exp_avg_sq) + ((max_exp_avg_sq,) if amsgrad else ())
    order = _memory_order(param)
    flat = [_flat_in_place(a, order) for a in written]
    if any(f is None for f in flat) or not _one_float_dtype(grad, *written):
        return reference.adam_update_(
            param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, beta1, beta2, eps, step_size,
            bias_correction2_sqrt, weight_decay, param_decay,
        )  # fmt: skip
    # Python floats rounded to the dtype as NumPy rounds them; 1 - beta formed in float64 first.
    real = param.dtype.type
    scalars = (
        real(beta1), real(1.0 - beta1), real(beta2), real(1.0 - beta2), real(eps),
        real(step_size), real(bias_correction2_sqrt), real(weight_decay), real(param_decay),
    )  # fmt: skip
    flags = (param_decay != 1.0, weight_decay != 0.0, amsgrad)
    param_flat, exp_avg_flat, exp_avg_sq_flat = flat[:3]
    max_flat = flat[3] if amsgrad else exp_avg_sq_flat  # not read without amsgrad
    args = (
        param_flat, _flat(grad, order), exp_avg_flat, exp_avg_sq_flat, max_flat, *scalars,
        *map(_count, flags), _count(param.size),
    )  # fmt: skip
    _ELEMENTWISE.launch("adam_update", param.dtype, param.size, args)
    return param


# --- max-pooling with the arg-max of every window ---------------------------------------------


def _channels_last(a):
    """(N, C, H, W) as a C-contiguous (N, H, W, C) array (a view of channels-last data)."""
    return reference._array_module(a).ascontiguousarray(a.transpose(0, 2, 3, 1))


def _offsets(argmax) -> tuple:
    """A C-contiguous (N, OH, OW, C) arg-max (int8, or int32 for big windows) as the kernels
    take it: its bytes, and whether they are int32."""
    return argmax.reshape(-1).view(np.int8), _count(argmax.dtype == np.int32)


def _pooling_sizes(n, c, h, w, oh, ow, kh, kw, sh, sw) -> tuple:
    return tuple(map(_count, (n, c, h, w, oh, ow, kh, kw, sh, sw)))


def maxpool2d_argmax(x, kh: int, kw: int, sh: int, sw: int):
    """See ``reference.maxpool2d_argmax``: y and argmax (N, C, OH, OW), channels-last."""
    xp = reference._array_module(x)
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    y = xp.empty((n, oh, ow, c), x.dtype)
    argmax = xp.empty((n, oh, ow, c), np.int8 if kh * kw < 128 else np.int32)
    sizes = _pooling_sizes(n, c, h, w, oh, ow, kh, kw, sh, sw)
    args = (_channels_last(x), y, *_offsets(argmax), *sizes)
    _POOLING.launch("maxpool2d_argmax", x.dtype, y.size, args)
    return y.transpose(0, 3, 1, 2), argmax.transpose(0, 3, 1, 2)


def maxpool2d_scatter(gy, argmax, kh: int, kw: int, sh: int, sw: int, h: int, w: int):
    """See ``reference.maxpool2d_scatter``: gx (N, C, h, w), channels-last."""
    xp = reference._array_module(gy)
    n, c, oh, ow = gy.shape
    gx = xp.empty((n, h, w, c), gy.dtype)
    sizes = _pooling_sizes(n, c, h, w, oh, ow, kh, kw, sh, sw)
    args = (_channels_last(gy), *_offsets(_channels_last(argmax)), gx, *sizes)
    _POOLING.launch("maxpool2d_scatter", gy.dtype, gx.size, args)
    return gx.transpose(0, 3, 1, 2)


def maxpool2d_gather(x, argmax, kh: int, kw: int, sh: int, sw: int):
    """See ``reference.maxpool2d_gather``: y (N, C, OH, OW), channels-last."""
    xp = reference._array_module(x)
    n, c, h, w = x.shape
    oh, ow = argmax.shape[2:]
    y = xp.empty((n, oh, ow, c), x.dtype)
    sizes = _pooling_sizes(n, c, h, w, oh, ow, kh, kw, sh, sw)
    args = (_channels_last(x), *_offsets(_channels_last(argmax)), y, *sizes)
    _POOLING.launch("maxpool2d_gather", x.dtype, y.size, args)
    return y.transpose(0, 3, 1, 2)


# --- convolution windows: im2col and its adjoint col2im ---------------------------------------


def im2col(x, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int):
    """See ``reference.im2col``: cols (N, OH, OW, kh, kw, C), C-contiguous."""
    xp = reference._array_module(x)
    n, c, h, w = x.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    cols = xp.empty((n, oh, ow, kh, kw, c), x.dtype)
    sizes = map(_count, (n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw))
    _WINDOWS.launch("im2col", x.dtype, cols.size, (_channels_last(x), cols, *sizes))
    return cols


def col2im(cols, h: int, w: int, sh: int, sw: int, ph: int, pw: int):
    """See ``reference.col2im``: gx (N, C, h, w), channels-last."""
    xp = reference._array_module(cols)
    n, oh, ow, kh, kw, c = cols.shape
    gx = xp.empty((n, h, w, c), cols.dtype)
    sizes = map(_count, (n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw))
    _WINDOWS.launch("col2im", cols.dtype, gx.size, (xp.ascontiguousarray(cols), gx, *sizes))
    return gx.transpose(0, 3, 1, 2)


# --- softmax cross-entropy from logits --------------------------------------------------------


def _labels(xp, labels):
    """Labels as a C-contiguous int64 array of module xp (host labels are copied over)."""
    return xp.ascontiguousarray(xp.asarray(labels), dtype=np.int64)


def softmax_xent_forward(logits, labels):
    """See ``reference.softmax_xent_forward``: loss (N,) and softmax(logits) (N, C)."""
    xp = reference._array_module(logits)
    n, c = logits.shape
    loss, probs = xp.empty(n, logits.dtype), xp.empty((n, c), logits.dtype)
    args = (xp.ascontiguousarray(logits), _labels(xp, labels), loss, probs, _count(n), _count(c))
    _SOFTMAX_XENT.launch("softmax_xent_forward", logits.dtype, n, args)
    return loss, probs


def softmax_xent_backward(probs, labels, gloss):
    """See ``reference.softmax_xent_backward``: glogits (N, C)."""
    xp = reference._array_module(probs)
    n, c = probs.shape
    glogits = xp.empty((n, c), probs.dtype)
    args = (
        xp.ascontiguousarray(probs), _labels(xp, labels), xp.ascontiguousarray(gloss), glogits,
        _count(n), _count(c),
    )  # fmt: skip
    _SOFTMAX_XENT.launch("softmax_xent_backward", probs.dtype, glogits.size, args)
    return glogits
