"""Dtype promotion follows PyTorch's rule (issue 11); see docs/autograd-rules.md.

Expected dtypes were read off torch 2.13 once and are written in here (torch is not imported):
a Python number counts only when its category (bool < int < float) is higher than the
tensor's, and then brings its category's default dtype (int64, float32); true division of
integers gives float32. NumPy alone would give float64 for int64 * 2.5 and int64 / 2.
"""

from __future__ import annotations

import numpy as np
import pytest

import tinymeta as tm

BINARY = {
    "add": lambda a, b: a + b,
    "radd": lambda a, b: b + a,
    "sub": lambda a, b: a - b,
    "rsub": lambda a, b: b - a,
    "mul": lambda a, b: a * b,
    "rmul": lambda a, b: b * a,
    "pow": lambda a, b: a**b,
    "rpow": lambda a, b: b**a,
    "maximum": lambda a, b: tm.maximum(a, b),
    "minimum": lambda a, b: tm.minimum(a, b),
    "where": lambda a, b: tm.where(a > 1, a, b),
    "rwhere": lambda a, b: tm.where(a > 1, b, a),
}
DIVISION = {"div": lambda a, b: a / b, "rdiv": lambda a, b: b / a}

# (tensor dtype, Python scalar) -> the dtype of a op b for + - * ** maximum minimum where
NON_DIVIDING = {
    ("int64", 2): "int64",
    ("int64", 2.5): "float32",
    ("int64", True): "int64",
    ("int32", 2): "int32",
    ("int32", 2.5): "float32",
    ("int32", True): "int32",
    ("uint8", 2): "uint8",
    ("uint8", 2.5): "float32",
    ("bool", 2): "int64",
    ("bool", 2.5): "float32",
    ("float32", 2): "float32",
    ("float32", 2.5): "float32",
    ("float32", True): "float32",
    ("float64", 2): "float64",
    ("float64", 2.5): "float64",
    ("float64", True): "float64",
}
# true division: integers and bools give float32, floats keep their dtype
DIVIDING = {
    ("int64", 2): "float32",
    ("int64", 2.5): "float32",
    ("int32", 2): "float32",
    ("bool", 2): "float32",
    ("uint8", 3): "float32",
    ("float32", 2): "float32",
    ("float64", 2): "float64",
    ("float64", 2.5): "float64",
}
# two tensors: the higher category's dtype; NumPy's widening within a category
TENSOR_PAIRS = {
    ("int64", "float32"): "float32",
    ("float32", "int64"): "float32",
    ("bool", "float64"): "float64",
    ("int32", "int64"): "int64",
    ("bool", "int32"): "int32",
    ("float32", "float64"): "float64",
}


def _tensor(dtype: str) -> tm.Tensor:
    return tm.tensor(np.array([1, 2, 3]).astype(dtype))


def _skip_undefined(name: str, dtype: str, scalar) -> None:
    if name in ("sub", "rsub") and (dtype == "bool" or scalar is True):
        pytest.skip("subtraction of bools is an error in PyTorch")
    if name in ("pow", "rpow") and dtype == "bool" and scalar is True:
        pytest.skip("bool ** bool: not covered")


@pytest.mark.parametrize("name", sorted(BINARY))
@pytest.mark.parametrize(("dtype", "scalar"), sorted(NON_DIVIDING, key=repr))
def test_scalar_promotion(name, dtype, scalar):
    _skip_undefined(name, dtype, scalar)
    x = _tensor(dtype)
    y = BINARY[name](x, scalar)
    assert y.dtype == np.dtype(NON_DIVIDING[dtype, scalar]), (name, dtype, scalar)
    if y.dtype.kind == "u":
        return  # uint8 wraps around below 0 (as in PyTorch): the dtype is what is checked
    expected = BINARY[name](np.array([1, 2, 3]).astype(dtype).astype(float), float(scalar))
    np.testing.assert_allclose(y.numpy().astype(float), expected, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(DIVISION))
@pytest.mark.parametrize(("dtype", "scalar"), sorted(DIVIDING, key=repr))
def test_true_division_promotion(name, dtype, scalar):
    y = DIVISION[name](_tensor(dtype), scalar)
    assert y.dtype == np.dtype(DIVIDING[dtype, scalar])
    expected = DIVISION[name](np.array([1, 2, 3]).astype(dtype).astype(float), float(scalar))
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("op", ["add", "mul", "div", "maximum", "where"])
@pytest.mark.parametrize(("da", "db"), sorted(TENSOR_PAIRS))
def test_tensor_pair_promotion(op, da, db):
    fn = {
        "add": tm.ops.add,
        "mul": tm.ops.mul,
        "div": tm.ops.div,
        "maximum": tm.maximum,
        "where": lambda a, b: tm.where(a > 1, a, b),
    }[op]
    expected = np.dtype(TENSOR_PAIRS[da, db])
    if op == "div" and expected.kind in "biu":
        expected = np.dtype("float32")
    assert fn(_tensor(da), _tensor(db)).dtype == expected


def test_int_by_int_tensor_division_is_float32():
    y = _tensor("int64") / _tensor("int64")
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y.numpy(), [1.0, 1.0, 1.0])


def test_promoted_float_result_is_differentiable():
    # the integer operand is cast as a constant; the float one keeps its gradient
    w = tm.tensor([0.5, 1.5, 2.0], requires_grad=True)
    k = _tensor("int64")
    (g,) = tm.grad((w * k + k * 2.5).sum(), w)
    assert g.dtype == np.float32
    np.testing.assert_array_equal(g.numpy(), [1.0, 2.0, 3.0])


def test_float32_tensor_and_float_scalar_stay_float32():
    x = tm.tensor([1.0, 2.0], requires_grad=True)
    for y in (x * 2.5, 2.5 * x, x + 1, x / 3, 3 / x, x**2.5, tm.maximum(x, 1.5)):
        assert y.dtype == np.float32
