"""Compiled kernels (shipped as ``tinymeta.kernels``): arrays in, arrays out.

This package never imports tinymeta. Every kernel has up to three implementations with the
same signature and results:

  ``reference``        vectorized NumPy (and CuPy: the same code runs on device arrays)
  ``numba_impl``       Numba-compiled loops, CPU only
  ``cuda_impl``,       CUDA kernels (kernels/cuda/*.cu, compiled by NVRTC through CuPy on first
  ``cuda_batchnorm``   use) for CuPy arrays: the fused ops that have one

The environment variable ``TINYMETA_KERNELS`` picks the backend: ``numba`` (the default, when
Numba imports) or ``numpy`` (the reference). ``backend()`` says which is active and
``set_backend(name)`` switches (tests and benchmarks compare the two). Under ``numba``, NumPy
arrays go to the Numba loops and CuPy arrays to the CUDA kernels (a kernel without a CUDA
version runs the reference on the device arrays); under ``numpy`` both go to the reference:
the escape hatch, and what the CUDA kernels are tested against.

Numba is imported on the first kernel call, not with this package: its import and set-up take
about half a second, which ``import tinymeta`` (and code that never calls a kernel) should not
pay. Each kernel's machine code then comes from Numba's on-disk cache (``cache=True``), one
signature at a time as calls need it.

The functions below check their arguments, bring per-channel parameters to the shape the
implementations expect and dispatch:

  bn_stats(x, eps) -> mean, inv_std                             x: (T, N, C, S)
  bn_forward(x, weight, bias, eps) -> y, mean, inv_std
  bn_backward(gy, x, mean, inv_std, weight) -> gx, gw, gb
  bn_double_backward(gy, x, mean, inv_std, weight, ggx=, ggw=, ggb=) -> g_gy, g_x, g_w
  maxpool2d_argmax(x, kh, kw, sh, sw) -> y, argmax              x: (N, C, H, W)
  maxpool2d_scatter(gy, argmax, kh, kw, sh, sw, h, w) -> gx     gy, argmax: (N, C, OH, OW)
  maxpool2d_gather(x, argmax, kh, kw, sh, sw) -> y
  im2col(x, kh, kw, sh, sw, ph, pw) -> cols                     cols: (N, OH, OW, kh, kw, C)
  col2im(cols, h, w, sh, sw, ph, pw) -> gx                      gx: (N, C, h, w)
  winograd_input(x, ph, pw) -> v                                v: (16, N, th, tw, C)
  winograd_input_adjoint(v, h, w, ph, pw) -> gx
  winograd_output(m, oh, ow) -> y                               m: (16, N, th, tw, O)
  winograd_output_adjoint(gy, th, tw) -> m
  softmax_xent_forward(logits, labels) -> loss, probs           logits: (N, C)
  softmax_xent_backward(probs, labels, gloss) -> glogits
  relu_backward(gy, x) -> gx                                    any shape
  sgd_update_(param, grad, lr) -> param (updated in place)      any shape
  adam_update_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, beta1=, beta2=, eps=,
               step_size=, bias_correction2_sqrt=, weight_decay=, param_decay=) -> param
  lstm_pointwise_forward(gates, c) -> h, c_new                  gates: (M, 4H), c: (M, H)
  lstm_pointwise_backward(gates, c, gh, gc) -> dgates, dc
  gru_pointwise_forward(gi, gh, h) -> h_new                     gi, gh: (M, 3H), h: (M, H)
  gru_pointwise_backward(gi, gh, h, gy) -> dgi, dgh, dh
  erf(x) -> y                                                   any shape
  matmul(a, b) -> a @ b          NumPy: a @ b; CuPy: our kernel or cuBLAS (cuda_matmul_choice)
"""

from __future__ import annotations

import importlib
import math
import os

import numpy as np

from . import reference

_BACKENDS = ("numba", "numpy")


def _load(name: str):
    if name == "numpy":
        return reference
    if name == "numba":
        from . import numba_impl

        return numba_impl
    raise ValueError(f"TINYMETA_KERNELS must be one of {_BACKENDS}, got {name!r}")


def _initial_backend():
    name = os.environ.get("TINYMETA_KERNELS", "numba").strip().lower() or "numba"
    if name not in _BACKENDS:  # a typo fails now, not at the first kernel call
        raise ValueError(f"TINYMETA_KERNELS must be one of {_BACKENDS}, got {name!r}")
    return name


_requested = _initial_backend()
_impl = None  # the module, loaded by _active() on the first kernel call


def _active():
    """The implementation module; the first call imports it (and with it Numba)."""
    global _impl
    if _impl is None:
        try:
            _impl = _load(_requested)
        except ImportError:  # no (working) Numba: the reference is always there
            _impl = reference
    return _impl


def backend() -> str:
    """The active implementation: ``"numba"`` or ``"numpy"``."""
    return "numpy" if _active() is reference else "numba"


def set_backend(name: str) -> str:
    """Switch to ``"numba"`` or ``"numpy"``; returns the previous backend's name."""
    global _impl
    previous = backend()
    _impl = _load(name)
    return previous


class _CudaKernels:
    """The CUDA implementation of each kernel, looked up by name: the first of cuda_impl,
    cuda_batchnorm and cuda_matmul that defines it, else the reference (which runs on CuPy
    arrays)."""

    _CUDA_MODULES = ("cuda_impl", "cuda_batchnorm", "cuda_matmul")

    def __getattr__(self, name: str):
        for module_name in self._CUDA_MODULES:  # imported on the first CuPy array
            module = importlib.import_module(f".{module_name}", __name__)
            if hasattr(module, name):
                kernel = getattr(module, name)
                break
        else:
            kernel = getattr(reference, name)
        setattr(self, name, kernel)  # __getattr__ runs once per kernel name
        return kernel


_cuda = _CudaKernels()


def _impl_for(array):
    """Host arrays take the active backend; device (CuPy) arrays the CUDA kernels, or the
    reference under the ``numpy`` backend."""
    impl = _impl or _active()
    if isinstance(array, np.ndarray):
        return impl
    if impl is not reference and type(array).__module__.startswith("cupy"):
        return _cuda
    return reference


def _check_float(op: str, **arrays) -> np.dtype:
    """The common float dtype of ``arrays`` (float32 or float64), or a TypeError naming them."""
    dtypes = {name: np.dtype(a.dtype) for name, a in arrays.items()}
    first = next(iter(dtypes.values()))
    if first not in (np.float32, np.float64) or any(d != first for d in dtypes.values()):
        found = ", ".join(f"{name} {d}" for name, d in dtypes.items())
        raise TypeError(f"{op}: expected float32 or float64 arrays of one dtype, got {found}")
    return first


def _per_channel_param(op: str, name: str, p, x):
    """``p`` of shape (C,) or (T, C) as a (T, C) array in x's dtype."""
    t, c = x.shape[0], x.shape[2]
    if tuple(p.shape) not in ((c,), (t, c)):
        raise ValueError(
            f"{op}: {name} must have shape ({c},) or ({t}, {c}) for x of shape "
            f"{tuple(x.shape)}, got {tuple(p.shape)}"
        )
    xp = reference._array_module(x)
    return xp.broadcast_to(p.astype(x.dtype, copy=False), (t, c))


def _check_bn_input(op: str, x):
    if x.ndim != 4 or 0 in x.shape:
        raise ValueError(f"{op}: expected a non-empty (T, N, C, S) array, got shape {x.shape}")


def _check_stats(op: str, x, **stats):
    stat_shape = (x.shape[0], x.shape[2])
    for name, stat in stats.items():
        if tuple(stat.shape) != stat_shape:
            raise ValueError(
                f"{op}: {name} must have shape {stat_shape} for x of shape {x.shape}, "
                f"got {tuple(stat.shape)}"
            )
        # Mixed dtypes would promote in the reference but not in the compiled kernels.
        if np.dtype(stat.dtype) != np.dtype(x.dtype):
            raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}, got {stat.dtype}")


def bn_stats(x, eps: float):
    """Per (task, channel) mean and inv_std = 1 / sqrt(var + eps) of x (T, N, C, S)."""
    _check_bn_input("bn_stats", x)
    _check_float("bn_stats", x=x)
    return _impl_for(x).bn_stats(x, eps)


def bn_forward(x, weight, bias, eps: float):
    """Batch-norm forward per (task, channel) of x (T, N, C, S): returns y, mean, inv_std."""
    _check_bn_input("bn_forward", x)
    _check_float("bn_forward", x=x)
    w = _per_channel_param("bn_forward", "weight", weight, x)
    b = _per_channel_param("bn_forward", "bias", bias, x)
    return _impl_for(x).bn_forward(x, w, b, eps)


def bn_backward(gy, x, mean, inv_std, weight):
    """Batch-norm backward: gx (T, N, C, S) and gw, gb (T, C); see ``reference.bn_backward``."""
    _check_bn_input("bn_backward", x)
    _check_float("bn_backward", gy=gy, x=x)
    if gy.shape != x.shape:
        raise ValueError(f"bn_backward: gy has shape {gy.shape} but x has shape {x.shape}")
    _check_stats("bn_backward", x, mean=mean, inv_std=inv_std)
    w = _per_channel_param("bn_backward", "weight", weight, x)
    return _impl_for(x).bn_backward(gy, x, mean, inv_std, w)


def bn_double_backward(
    gy,
    x,
    mean,
    inv_std,
    weight=None,
    ggx=None,
    ggw=None,
    ggb=None,
    need_gy: bool = True,
    need_x: bool = True,
):
    """Batch-norm double backward: the derivatives of <ggx, gx> + <ggw, gw> + <ggb, gb> with
    respect to gy, x and the weight, where gx, gw, gb = ``bn_backward(gy, x, ..., weight)``.

    x, gy and ggx are (T, N, C, S); weight, ggw and ggb (C,) or (T, C). A missing ggx, ggw or
    ggb is zero; a missing weight is one. Returns g_gy and g_x (T, N, C, S), each None when
    ``need_gy`` / ``need_x`` is false, and g_w (T, C). See ``reference.bn_double_backward``.
    """
    op = "bn_double_backward"
    _check_bn_input(op, x)
    arrays = {"gy": gy, "x": x} if ggx is None else {"gy": gy, "x": x, "ggx": ggx}
    _check_float(op, **arrays)
    for name, a in arrays.items():
        if a.shape != x.shape:
            raise ValueError(f"{op}: {name} has shape {a.shape} but x has shape {x.shape}")
    _check_stats(op, x, mean=mean, inv_std=inv_std)
    xp = reference._array_module(x)
    t, c = x.shape[0], x.shape[2]

    def param(name, p, default):
        if p is None:
            return xp.full((t, c), default, dtype=x.dtype)
        return _per_channel_param(op, name, p, x)

    w, ggw, ggb = param("weight", weight, 1.0), param("ggw", ggw, 0.0), param("ggb", ggb, 0.0)
    return _impl_for(x).bn_double_backward(
        gy, x, mean, inv_std, w, ggx, ggw, ggb, need_gy=need_gy, need_x=need_x
    )


def maxpool2d_argmax(x, kh: int, kw: int, sh: int, sw: int):
    """y[n,c,i,j] = max over window (i, j) of x (N, C, H, W), and each window's arg-max offset
    p * kw + q (int8; int32 for windows of 128+ elements). Ties go to the first offset."""
    _check_float("maxpool2d_argmax", x=x)
    if x.ndim != 4 or min(kh, kw, sh, sw) < 1 or kh > x.shape[2] or kw > x.shape[3]:
        raise ValueError(
            f"maxpool2d_argmax: expected an (N, C, H, W) array and a positive window that fits "
            f"in it, got shape {x.shape}, window ({kh}, {kw}), stride ({sh}, {sw})"
        )
    return _impl_for(x).maxpool2d_argmax(x, int(kh), int(kw), int(sh), int(sw))


def _check_pool_argmax(op: str, argmax, out_shape: tuple, **window):
    if argmax.dtype not in (np.int8, np.int32) or tuple(argmax.shape) != tuple(out_shape):
        raise ValueError(
            f"{op}: expected an int8 or int32 arg-max of shape {tuple(out_shape)} for window "
            f"{window}, got shape {tuple(argmax.shape)} dtype {argmax.dtype}"
        )


def maxpool2d_scatter(gy, argmax, kh: int, kw: int, sh: int, sw: int, h: int, w: int):
    """gx (N, C, h, w): gy[n,c,i,j] added at the arg-max p * kw + q of window (i, j), i.e. at
    gx[n,c,i*sh+p,j*sw+q]; zeros elsewhere. The gradient of the max-pool (and of the gather)."""
    _check_float("maxpool2d_scatter", gy=gy)
    if gy.ndim != 4 or min(kh, kw, sh, sw) < 1 or kh > h or kw > w:
        raise ValueError(
            f"maxpool2d_scatter: expected an (N, C, OH, OW) gradient and a positive window that "
            f"fits in the ({h}, {w}) input, got shape {gy.shape}, window ({kh}, {kw})"
        )
    out_hw = ((h - kh) // sh + 1, (w - kw) // sw + 1)
    if tuple(gy.shape[2:]) != out_hw:
        raise ValueError(
            f"maxpool2d_scatter: a ({kh}, {kw}) window with stride ({sh}, {sw}) on a ({h}, {w}) "
            f"input gives {out_hw} outputs, but gy has shape {gy.shape}"
        )
    _check_pool_argmax("maxpool2d_scatter", argmax, gy.shape, kernel=(kh, kw), stride=(sh, sw))
    return _impl_for(gy).maxpool2d_scatter(gy, argmax, *map(int, (kh, kw, sh, sw, h, w)))


def maxpool2d_gather(x, argmax, kh: int, kw: int, sh: int, sw: int):
    """y[n,c,i,j] = x[n,c,i*sh+p,j*sw+q] at the arg-max p * kw + q of window (i, j) of
    x (N, C, H, W): the max-pool with its windows' arg-max held fixed."""
    _check_float("maxpool2d_gather", x=x)
    if x.ndim != 4 or min(kh, kw, sh, sw) < 1 or kh > x.shape[2] or kw > x.shape[3]:
        raise ValueError(
            f"maxpool2d_gather: expected an (N, C, H, W) array and a positive window that fits "
            f"in it, got shape {x.shape}, window ({kh}, {kw}), stride ({sh}, {sw})"
        )
    n, c, h, w = x.shape
    out_shape = (n, c, (h - kh) // sh + 1, (w - kw) // sw + 1)
    _check_pool_argmax("maxpool2d_gather", argmax, out_shape, kernel=(kh, kw), stride=(sh, sw))
    return _impl_for(x).maxpool2d_gather(x, argmax, *map(int, (kh, kw, sh, sw)))


def _check_conv_window(op: str, h: int, w: int, kh: int, kw: int, sh: int, sw: int, ph, pw):
    if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0 or kh > h + 2 * ph or kw > w + 2 * pw:
        raise ValueError(
            f"{op}: expected a positive window ({kh}, {kw}) and stride ({sh}, {sw}), padding "
            f"({ph}, {pw}) >= 0, and the window to fit in the padded ({h}, {w}) input"
        )


def im2col(x, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int):
    """cols[n,i,j,p,q,c] = x_pad[n,c,i*sh+p,j*sw+q]: the kh x kw windows of x (N, C, H, W),
    zero-padded by (ph, pw), as a C-contiguous (N, OH, OW, kh, kw, C) array."""
    _check_float("im2col", x=x)
    if x.ndim != 4:
        raise ValueError(f"im2col: expected an (N, C, H, W) array, got shape {x.shape}")
    _check_conv_window("im2col", *x.shape[2:], kh, kw, sh, sw, ph, pw)
    return _impl_for(x).im2col(x, *map(int, (kh, kw, sh, sw, ph, pw)))


def col2im(cols, h: int, w: int, sh: int, sw: int, ph: int, pw: int):
    """gx (N, C, h, w), channels-last: every window element of cols (N, OH, OW, kh, kw, C)
    added back onto the input pixel it came from; the adjoint of ``im2col``."""
    _check_float("col2im", cols=cols)
    if cols.ndim != 6:
        raise ValueError(f"col2im: expected (N, OH, OW, kh, kw, C) windows, got {cols.shape}")
    kh, kw = cols.shape[3:5]
    _check_conv_window("col2im", h, w, kh, kw, sh, sw, ph, pw)
    out_hw = ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
    if tuple(cols.shape[1:3]) != out_hw:
        raise ValueError(
            f"col2im: a ({kh}, {kw}) window with stride ({sh}, {sw}) and padding ({ph}, {pw}) "
            f"on a ({h}, {w}) input has {out_hw} positions, but cols has shape {cols.shape}"
        )
    return _impl_for(cols).col2im(cols, *map(int, (h, w, sh, sw, ph, pw)))


def winograd_tiles(h: int, w: int, ph: int, pw: int) -> tuple:
    """(oh, ow, th, tw): a 3x3 stride-1 convolution's output size and its 2x2 output tiles."""
    return reference.winograd_tiles(h, w, ph, pw)


def _check_winograd_tiles(op: str, name: str, shape: tuple, expected: tuple):
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{op}: expected {name} of shape {tuple(expected)}, got {tuple(shape)}")


def winograd_input(x, ph: int, pw: int):
    """(16, N, th, tw, C): the 4x4 tiles (stride 2) of x (N, C, H, W), zero-padded by (ph, pw),
    under Winograd F(2x2, 3x3)'s input transform (``reference.winograd_input``)."""
    _check_float("winograd_input", x=x)
    if x.ndim != 4 or min(ph, pw) < 0 or min(x.shape[2] + 2 * ph, x.shape[3] + 2 * pw) < 3:
        raise ValueError(
            f"winograd_input: expected an (N, C, H, W) array whose padded size fits a 3x3 window, "
            f"got shape {x.shape}, padding ({ph}, {pw})"
        )
    return _impl_for(x).winograd_input(x, int(ph), int(pw))


def winograd_input_adjoint(v, h: int, w: int, ph: int, pw: int):
    """gx (N, C, h, w), channels-last: the adjoint of ``winograd_input`` on v (16, N, th, tw, C)."""
    _check_float("winograd_input_adjoint", v=v)
    if v.ndim != 5 or min(ph, pw) < 0 or min(h + 2 * ph, w + 2 * pw) < 3:
        raise ValueError(
            f"winograd_input_adjoint: expected (16, N, th, tw, C) tiles of an input whose padded "
            f"size fits a 3x3 window, got shape {v.shape}, input ({h}, {w}), padding ({ph}, {pw})"
        )
    _, _, th, tw = winograd_tiles(h, w, ph, pw)
    n, c = v.shape[1], v.shape[4]
    _check_winograd_tiles("winograd_input_adjoint", "v", v.shape, (16, n, th, tw, c))
    return _impl_for(v).winograd_input_adjoint(v, *map(int, (h, w, ph, pw)))


def winograd_output(m, oh: int, ow: int):
    """y (N, O, oh, ow), channels-last: Winograd F(2x2, 3x3)'s output transform of the 16
    channel products m (16, N, th, tw, O) of every 2x2 output tile."""
    _check_float("winograd_output", m=m)
    if m.ndim != 5 or min(oh, ow) < 1:
        raise ValueError(
            f"winograd_output: expected (16, N, th, tw, O) products and a positive output size, "
            f"got shape {m.shape} and ({oh}, {ow})"
        )
    n, o = m.shape[1], m.shape[4]
    expected = (16, n, (oh + 1) // 2, (ow + 1) // 2, o)
    _check_winograd_tiles("winograd_output", "m", m.shape, expected)
    return _impl_for(m).winograd_output(m, int(oh), int(ow))


def winograd_output_adjoint(gy, th: int, tw: int):
    """(16, N, th, tw, O): the adjoint of ``winograd_output`` on gy (N, O, oh, ow)."""
    _check_float("winograd_output_adjoint", gy=gy)
    if gy.ndim != 4 or (th, tw) != ((gy.shape[2] + 1) // 2, (gy.shape[3] + 1) // 2):
        raise ValueError(
            f"winograd_output_adjoint: expected an (N, O, oh, ow) gradient with ({th}, {tw}) "
            f"2x2 tiles, got shape {gy.shape}"
        )
    return _impl_for(gy).winograd_output_adjoint(gy, int(th), int(tw))


def _check_labels(op: str, labels, n: int, c: int):
    if labels.ndim != 1 or labels.shape[0] != n or np.dtype(labels.dtype).kind not in "iu":
        raise ValueError(
            f"{op}: expected {n} integer labels, got shape {labels.shape} dtype {labels.dtype}"
        )


def softmax_xent_forward(logits, labels):
    """loss_n = logsumexp(logits_n) - logits_n[labels_n] for logits (N, C), and the softmax.

    Labels are assumed to lie in [0, C) (callers check them once, before any copy)."""
    _check_float("softmax_xent_forward", logits=logits)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"softmax_xent_forward: expected (N, C) logits, got {logits.shape}")
    _check_labels("softmax_xent_forward", labels, *logits.shape)
    return _impl_for(logits).softmax_xent_forward(logits, labels)


def softmax_xent_backward(probs, labels, gloss):
    """glogits = gloss_n * (probs_n - onehot(labels_n)), for probs = softmax(logits) (N, C)."""
    _check_float("softmax_xent_backward", probs=probs, gloss=gloss)
    if probs.ndim != 2 or gloss.shape != probs.shape[:1]:
        raise ValueError(
            f"softmax_xent_backward: expected probs (N, C) and gloss (N,), got {probs.shape} "
            f"and {gloss.shape}"
        )
    _check_labels("softmax_xent_backward", labels, *probs.shape)
    return _impl_for(probs).softmax_xent_backward(probs, labels, gloss)


# --- elementwise steps of a training loop ---------------------------------------------------


def _check_same_shape(op: str, a_name: str, a, b_name: str, b):
    if a.shape != b.shape:
        raise ValueError(
            f"{op}: expected arrays of one shape, got {a_name} {tuple(a.shape)} and "
            f"{b_name} {tuple(b.shape)}"
        )


# These two take any dtype (a float16 model still trains): the Numba loops run for float32
# and float64, every other dtype (or a mix) takes the reference.


def relu_forward(x):
    """y = max(x, 0), as NumPy's maximum gives it (NaN stays NaN, -0.0 becomes +0.0)."""
    return _impl_for(x).relu_forward(x)


def relu_backward(gy, x):
    """gx = gy * [x > 0]: the ReLU's gradient (zero where x <= 0), in gy's dtype."""
    _check_same_shape("relu_backward", "gy", gy, "x", x)
    return _impl_for(gy).relu_backward(gy, x)


def sgd_update_(param, grad, lr: float):
    """param -= lr * grad, in place (with lr in param's dtype); returns param."""
    _check_same_shape("sgd_update_", "param", param, "grad", grad)
    return _impl_for(param).sgd_update_(param, grad, lr)


def adam_update_(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq=None,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    bias_correction2_sqrt: float,
    weight_decay: float = 0.0,
    param_decay: float = 1.0,
):
    """One Adam step of one parameter: param and the moments (and max_exp_avg_sq, given
    with amsgrad) updated in place, rounding as NumPy does (see ``reference.adam_update_``);
    returns param. The scalars come from ``tinymeta.optim.Adam``: step_size = -lr / (1 -
    beta1**t), bias_correction2_sqrt = sqrt(1 - beta2**t), param_decay = 1 - lr * lambda
    for AdamW (1 otherwise)."""
    _check_same_shape("adam_update_", "param", param, "grad", grad)
    _check_same_shape("adam_update_", "param", param, "exp_avg", exp_avg)
    _check_same_shape("adam_update_", "param", param, "exp_avg_sq", exp_avg_sq)
    if max_exp_avg_sq is not None:
        _check_same_shape("adam_update_", "param", param, "max_exp_avg_sq", max_exp_avg_sq)
    return _impl_for(param).adam_update_(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
        beta1, beta2, eps, step_size, bias_correction2_sqrt, weight_decay, param_decay,
    )  # fmt: skip


# --- recurrent cells ------------------------------------------------------------------------


def _check_gates(op: str, k: int, gates, state, **others):
    """gates (M, k * H) next to a state (M, H) and ``others`` of the shapes they must have."""
    if gates.ndim != 2 or state.ndim != 2 or gates.shape != (state.shape[0], k * state.shape[1]):
        raise ValueError(
            f"{op}: expected gate pre-activations (M, {k} * H) and a state (M, H), got shapes "
            f"{tuple(gates.shape)} and {tuple(state.shape)}"
        )
    for name, (a, shape) in others.items():
        if tuple(a.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(a.shape)}")


def lstm_pointwise_forward(gates, c):
    """One LSTM step after the matrix products: gates (M, 4H) in PyTorch's order i, f, g, o,
    c (M, H); c' = sigmoid(f) c + sigmoid(i) tanh(g), h' = sigmoid(o) tanh(c'). Returns h', c'."""
    _check_float("lstm_pointwise_forward", gates=gates, c=c)
    _check_gates("lstm_pointwise_forward", 4, gates, c)
    return _impl_for(gates).lstm_pointwise_forward(gates, c)


def lstm_pointwise_backward(gates, c, gh, gc, out=None):
    """The gradients (dgates (M, 4H), dc (M, H)) of ``lstm_pointwise_forward`` given gh, gc.

    ``out``: a C-contiguous array (M, 4H) of gates' dtype that receives dgates (a time step's
    rows of a layer's gradient buffer), instead of a new one."""
    _check_float("lstm_pointwise_backward", gates=gates, c=c, gh=gh, gc=gc)
    _check_gates("lstm_pointwise_backward", 4, gates, c, gh=(gh, c.shape), gc=(gc, c.shape))
    if out is not None and (
        out.shape != gates.shape or out.dtype != gates.dtype or not out.flags.c_contiguous
    ):
        raise ValueError(
            f"lstm_pointwise_backward: out must be a C-contiguous {gates.dtype} array of shape "
            f"{tuple(gates.shape)}, got {out.dtype} {tuple(out.shape)}"
        )
    return _impl_for(gates).lstm_pointwise_backward(gates, c, gh, gc, out)


def gru_pointwise_forward(gi, gh, h):
    """One GRU step after the matrix products: gi = x W_ih^T + b_ih, gh = h W_hh^T + b_hh
    (M, 3H) in PyTorch's order r, z, n, and h (M, H). Returns h' = (1 - z) n + z h."""
    _check_float("gru_pointwise_forward", gi=gi, gh=gh, h=h)
    _check_gates("gru_pointwise_forward", 3, gi, h, gh=(gh, gi.shape))
    return _impl_for(gi).gru_pointwise_forward(gi, gh, h)


def gru_pointwise_backward(gi, gh, h, gy):
    """The gradients (dgi, dgh (M, 3H), dh (M, H)) of ``gru_pointwise_forward`` given gy."""
    _check_float("gru_pointwise_backward", gi=gi, gh=gh, h=h, gy=gy)
    _check_gates("gru_pointwise_backward", 3, gi, h, gh=(gh, gi.shape), gy=(gy, h.shape))
    return _impl_for(gi).gru_pointwise_backward(gi, gh, h, gy)


def erf(x):
    """y = erf(x) elementwise, in x's dtype (float32 or float64)."""
    _check_float("erf", x=x)
    return _impl_for(x).erf(x)


# --- matrix products on CUDA: our kernel or cuBLAS ------------------------------------------

_CUDA_MATMUL_SETTINGS = ("auto", "kernel", "cublas")
# "auto" takes the kernel for products of at most KERNEL_MAX_PRODUCT multiply-adds each
# (M * N * K) and KERNEL_MAX_TOTAL in the batch. Products that small take microseconds either
# way, so the launch is the cost: ours is one kernel, which a CUDA graph can hold, where CuPy
# refuses any cuBLAS call during stream capture (a captured step then becomes a chain of
# graphs with the matmuls run between them). Larger ones go to cuBLAS's tiled GEMM: the kernel
# gives each output element one thread, which sums over K alone, without shared memory. Every
# product of W1 (the 1-40-40-1 sinusoid MLP over 25 tasks) lies well below: 10x40 @ 40x40
# (16,000 multiply-adds) per task is the largest.
KERNEL_MAX_PRODUCT = 64**3
KERNEL_MAX_TOTAL = 2**24


def _initial_cuda_matmul() -> str:
    name = os.environ.get("TINYMETA_CUDA_MATMUL", "auto").strip().lower() or "auto"
    if name not in _CUDA_MATMUL_SETTINGS:
        raise ValueError(
            f"TINYMETA_CUDA_MATMUL must be one of {_CUDA_MATMUL_SETTINGS}, got {name!r}"
        )
    return name


_cuda_matmul_setting = _initial_cuda_matmul()


def cuda_matmul_setting() -> str:
    """How CuPy matmuls are done: "auto" (the default), "kernel" or "cublas"."""
    return _cuda_matmul_setting


def set_cuda_matmul(name: str) -> str:
    """Switch CuPy matmuls to ``"auto"``, ``"kernel"`` or ``"cublas"``; returns the previous
    setting. A captured step keeps the choices made when it was captured."""
    global _cuda_matmul_setting
    if name not in _CUDA_MATMUL_SETTINGS:
        raise ValueError(f"set_cuda_matmul: expected one of {_CUDA_MATMUL_SETTINGS}, got {name!r}")
    previous, _cuda_matmul_setting = _cuda_matmul_setting, name
    return previous


def cuda_matmul_choice(a_shape: tuple, b_shape: tuple, a_dtype, b_dtype, setting=None) -> str:
    """``"kernel"`` or ``"cublas"``: what a product of CuPy arrays of these shapes and dtypes
    runs on under ``setting`` (default: the current one). Only shapes and dtypes decide, so an
    eager step and its capture make the same choices. Products the kernel does not take (other
    dtypes, mixed dtypes, a 1-D operand, shapes that do not line up) go to cuBLAS (``a @ b``,
    which raises CuPy's error for bad shapes), whatever the setting."""
    setting = _cuda_matmul_setting if setting is None else setting
    a_dtype, b_dtype = np.dtype(a_dtype), np.dtype(b_dtype)
    if (
        setting == "cublas"
        or a_dtype != b_dtype
        or a_dtype not in (np.float32, np.float64)
        or len(a_shape) < 2
        or len(b_shape) < 2
        or a_shape[-1] != b_shape[-2]
    ):
        return "cublas"
    try:
        batch = math.prod(np.broadcast_shapes(a_shape[:-2], b_shape[:-2]))
    except ValueError:
        return "cublas"
    if setting == "kernel":
        return "kernel"
    product = a_shape[-2] * a_shape[-1] * b_shape[-1]
    small = product <= KERNEL_MAX_PRODUCT and batch * product <= KERNEL_MAX_TOTAL
    return "kernel" if small else "cublas"


def matmul(a, b):
    """``a @ b`` with NumPy's semantics. NumPy arrays: ``a @ b`` itself. CuPy arrays: our
    kernel (``cuda_matmul.matmul``) or cuBLAS, as ``cuda_matmul_choice`` says."""
    if isinstance(a, np.ndarray):
        return a @ b
    if cuda_matmul_choice(a.shape, b.shape, a.dtype, b.dtype) == "kernel":
        return _cuda.matmul(a, b)  # cuda_matmul.matmul, imported on the first CuPy product
    return a @ b
