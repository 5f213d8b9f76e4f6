"""All differentiable ops; each family lives in its own module."""

from tinymeta.ops.arithmetic import add, add_scaled, div, mul, neg, power, sub
from tinymeta.ops.elementwise import abs, cos, exp, log, relu, sigmoid, sin, sqrt, tanh
from tinymeta.ops.linalg import einsum, matmul
from tinymeta.ops.reductions import logsumexp, max, mean, min, sum, var
from tinymeta.ops.selection import (
    astype,
    clip,
    equal,
    greater,
    greater_equal,
    less,
    less_equal,
    maximum,
    minimum,
    not_equal,
    to_device,
    where,
)
from tinymeta.ops.shape import (
    broadcast_to,
    concatenate,
    expand_dims,
    flatten,
    getitem,
    reshape,
    squeeze,
    stack,
    sum_to,
    swapaxes,
    transpose,
    unsqueeze,
)

__all__ = [
    "abs", "add", "add_scaled", "astype", "broadcast_to", "clip", "concatenate", "cos", "div",
    "einsum", "equal", "exp", "expand_dims", "flatten", "getitem", "greater", "greater_equal",
    "less", "less_equal", "log", "logsumexp", "matmul", "max", "maximum", "mean", "min", "minimum",
    "mul", "neg", "not_equal", "power", "relu", "reshape", "sigmoid", "sin", "sqrt", "squeeze",
    "stack", "sub", "sum", "sum_to", "swapaxes", "tanh", "to_device", "transpose", "unsqueeze",
    "var", "where",
]  # fmt: skip
