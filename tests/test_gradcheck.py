"""tinymeta.testing: gradcheck / gradgradcheck / check_grads catch wrong derivatives and
say where; the Hypothesis strategies produce what their docstrings claim."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import find, given
from hypothesis import strategies as st

import tinymeta as tm
from tinymeta.function import Function
from tinymeta.tensor import constant
from tinymeta.testing import check_grads, gradcheck, gradgradcheck
from tinymeta.testing import strategies as tms

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 4))
Y = RNG.standard_normal((3, 4))

# --- deliberately wrong ops --------------------------------------------------------------------


class SquareWrongAtOneElement(Function):
    """y = x**2;  the backward adds 1 at element (1, 2): a bug gradcheck must locate."""

    def forward(self, x):
        return x * x

    def backward(self, gy):
        (x,) = self.inputs
        bump = np.zeros(x.shape)
        bump[1, 2] = 1.0
        return gy * (2.0 * x) + constant(bump)


class MulWrongSecondInput(Function):
    """y = a * b;  gb is 10% too big."""

    def forward(self, a, b):
        return a * b

    def backward(self, gy):
        a, b = self.inputs
        return gy * b, gy * a * 1.1


class Cube(Function):
    """y = x**3;  gx = CubeGrad(x, gy), right at first order."""

    def forward(self, x):
        return x**3

    def backward(self, gy):
        (x,) = self.inputs
        return CubeGrad.apply(x, gy)


class CubeGrad(Function):
    """gx = 3 x^2 gy (right);  but d gx / dx should be 6 x gy, and this says 5 x gy."""

    def forward(self, x, gy):
        return 3.0 * x**2 * gy

    def backward(self, ggx):
        x, gy = self.inputs
        return ggx * gy * x * 5.0, ggx * 3.0 * x * x


class CubeGradRight(CubeGrad):
    def backward(self, ggx):
        x, gy = self.inputs
        return ggx * gy * x * 6.0, ggx * 3.0 * x * x


class CubeRight(Cube):
    def backward(self, gy):
        (x,) = self.inputs
        return CubeGradRight.apply(x, gy)


# --- correct functions pass -----------------------------------------------------------------------


def _mlp(x, w, b):
    return ((x @ w + b).tanh() ** 2).sum(axis=0)


CORRECT = {
    "mlp": (_mlp, [X, Y.T, np.array([0.1, -0.2, 0.3])]),
    "two outputs": (lambda a, b: (a * b, (a - b).exp().sum()), [X, Y]),
    "logsumexp": (lambda a: tm.logsumexp(a, axis=1), [X]),
    "custom cube": (lambda x: CubeRight.apply(x), [X]),
    "scalar input": (lambda s, a: (a * s).sin(), [np.float64(0.7), X]),
}


@pytest.mark.parametrize("name", CORRECT)
def test_correct_functions_pass(name):
    fn, inputs = CORRECT[name]
    assert gradcheck(fn, inputs) is True
    assert gradcheck(fn, inputs, full=True) is True
    assert gradgradcheck(fn, inputs) is True
    assert check_grads(fn, inputs, order=3) is True


def test_non_float_inputs_are_passed_through():
    index = np.array([2, 0, 2])
    assert check_grads(lambda x, i: x[i] * 2.0, [X, index], order=2)


def test_float32_inputs_are_checked_in_float64_and_left_alone():
    x32 = tm.tensor(X.astype(np.float32), requires_grad=True)
    before = x32.numpy().copy()
    seen = []

    def fn(x):
        seen.append(x.dtype)
        return x.exp()

    assert gradcheck(fn, [x32])
    assert set(seen) == {np.dtype(np.float64)}
    np.testing.assert_array_equal(x32.numpy(), before)
    assert x32.grad is None


# --- wrong functions fail, and say where ----------------------------------------------------------


@pytest.mark.parametrize("full", [False, True])
def test_gradcheck_names_the_input_and_the_worst_element(full):
    with pytest.raises(AssertionError) as info:
        gradcheck(lambda x: SquareWrongAtOneElement.apply(x), [X], full=full)
    message = str(info.value)
    assert "input 0 (shape (3, 4))" in message
    assert "worst element (1, 2)" in message
    assert "analytic" in message and "numerical" in message


def test_gradcheck_names_the_wrong_input_of_two():
    with pytest.raises(AssertionError, match=r"gradient mismatch for input 1 \(shape \(3, 4\)\)"):
        gradcheck(lambda a, b: MulWrongSecondInput.apply(a, b), [X, Y])


def test_wrong_second_derivative_passes_gradcheck_but_fails_gradgradcheck():
    fn = Cube.apply
    assert gradcheck(fn, [X])
    assert gradcheck(fn, [X], full=True)
    with pytest.raises(AssertionError, match=r"order 2\).*input 0 .*worst element"):
        gradgradcheck(fn, [X])
    with pytest.raises(AssertionError, match=r"order 2"):
        check_grads(fn, [X], order=3)
    with pytest.raises(AssertionError, match=r"order 2"):
        gradgradcheck(fn, [X], full=True)


def test_check_grads_order_1_is_gradcheck():
    assert check_grads(Cube.apply, [X], order=1)
    with pytest.raises(ValueError, match="order must be >= 1"):
        check_grads(Cube.apply, [X], order=0)


def test_a_gradient_that_is_off_by_a_little_more_than_the_tolerance_fails():
    class Scaled(Function):
        def forward(self, x):
            return 2.0 * x

        def backward(self, gy):
            return gy * 2.01

    with pytest.raises(AssertionError):
        gradcheck(Scaled.apply, [X], full=True)
    assert gradcheck(Scaled.apply, [X], full=True, rtol=0.01)


def test_a_missing_gradient_fails():
    # The output does not require grad: the analytic gradient is zero, the numerical is not.
    with pytest.raises(AssertionError, match="input 0"):
        gradcheck(lambda x: tm.tensor(x.numpy() * 3.0), [X])


# --- strategies -----------------------------------------------------------------------------------


@given(tms.shapes())
def test_shapes_are_in_range(shape):
    assert isinstance(shape, tuple) and 0 <= len(shape) <= 4
    assert all(isinstance(n, int) and 1 <= n <= 5 for n in shape)


@given(tms.shapes(min_dims=2, max_dims=3, min_side=2, max_side=3))
def test_shapes_respect_their_bounds(shape):
    assert 2 <= len(shape) <= 3 and all(2 <= n <= 3 for n in shape)


@given(st.integers(1, 4).flatmap(lambda n: st.tuples(st.just(n), tms.broadcastable_shapes(n))))
def test_broadcastable_shapes_broadcast(n_and_shapes):
    n, shapes = n_and_shapes
    assert len(shapes) == n
    out = np.broadcast_shapes(*shapes)
    assert all(len(s) <= 4 and all(1 <= k <= 5 for k in s) for s in shapes)
    assert len(out) == max(len(s) for s in shapes)


def test_broadcastable_shapes_cover_0d_size_1_and_rank_differences():
    pairs = tms.broadcastable_shapes(2)
    assert () in find(pairs, lambda ss: () in ss)
    ss = find(pairs, lambda ss: len(ss[0]) != len(ss[1]) and min(map(len, ss)) > 0)
    assert len(ss[0]) != len(ss[1])
    ss = find(pairs, lambda ss: any(a == 1 < b for a, b in zip(ss[0][::-1], ss[1][::-1])))
    assert any(a == 1 < b for a, b in zip(ss[0][::-1], ss[1][::-1]))


@given(
    tms.arrays(
        tms.shapes(), elements=tms.well_conditioned(bound=2.0, min_magnitude=0.25), dtype=np.float32
    )
)
def test_arrays_are_bounded_away_from_zero_finite_and_contiguous(a):
    assert a.dtype == np.float32 and a.flags.c_contiguous
    assert np.all(np.isfinite(a))
    assert np.all(np.abs(a) <= 2.0 + 1e-6) and np.all(np.abs(a) >= 0.25 - 1e-6)


@given(tms.arrays((3, 4), elements=tms.well_conditioned(min_magnitude=0.3, positive=True)))
def test_positive_arrays(a):
    assert a.shape == (3, 4) and a.dtype == np.float64
    assert np.all(a >= 0.3) and np.all(a <= 3.0)


@given(tms.arrays((20,), elements=tms.well_conditioned(avoid=(-0.5, 0.5), margin=0.1)))
def test_arrays_avoid_kinks(a):
    assert np.all(np.abs(a - 0.5) >= 0.1) and np.all(np.abs(a + 0.5) >= 0.1)


def test_well_conditioned_rejects_impossible_bounds():
    with pytest.raises(ValueError, match="min_magnitude"):
        tms.well_conditioned(bound=1.0, min_magnitude=2.0)


@given(tms.distinct_arrays(tms.shapes(max_side=4), spacing=0.1))
def test_distinct_arrays_have_no_near_ties(a):
    flat = np.sort(a.reshape(-1))
    assert np.all(np.diff(flat) >= 0.1 - 1e-9)


@given(tms.tensors(tms.shapes(), dtype=np.float32, requires_grad=True, noncontiguous=True))
def test_noncontiguous_tensors_are_really_noncontiguous(t):
    assert isinstance(t, tm.Tensor)
    assert not t.data.flags.c_contiguous
    assert t.size >= 2 and t.dtype == tm.float32 and t.requires_grad and t.is_leaf
    assert np.all(np.isfinite(t.numpy()))  # the NaN padding of the bigger array stays hidden
    assert np.all(np.abs(t.numpy()) <= 3.0)


@given(tms.tensors((2, 3)))
def test_tensors_default_to_contiguous_float64_without_grad(t):
    assert t.shape == (2, 3) and t.dtype == tm.float64
    assert t.data.flags.c_contiguous and not t.requires_grad


@pytest.mark.parametrize("how", ["stride", "reverse", "transpose"])
@pytest.mark.parametrize("shape", [(5,), (2, 3), (1, 4), (3, 1, 2), (2, 2, 2, 2)])
def test_as_noncontiguous_keeps_values(shape, how):
    a = np.arange(math.prod(shape), dtype=np.float64).reshape(shape)
    v = tms.as_noncontiguous(a, how)
    assert not v.flags.c_contiguous
    np.testing.assert_array_equal(v, a)


def test_as_noncontiguous_of_a_single_element_is_a_copy():
    a = np.array([[3.0]])
    v = tms.as_noncontiguous(a)
    np.testing.assert_array_equal(v, a)
    assert not np.shares_memory(v, a)


def test_tinymeta_does_not_need_hypothesis():
    code = (
        "import sys, tinymeta, tinymeta.testing;"
        "tinymeta.testing.gradcheck(tinymeta.exp, [tinymeta.ones(2)]);"
        "assert 'hypothesis' not in sys.modules, 'hypothesis imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
