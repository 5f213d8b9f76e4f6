"""squared_sum (c * sum(d * d) as one op, mse_loss's reduction): the same bits as the
composition Mul, Sum, Scale in every derivative order that MAML takes, and gradients of
every order checked against float64 finite differences."""

from __future__ import annotations

import numpy as np
import pytest

import tinymeta as tm
from tinymeta.ops.reductions import SquaredSum, SquaredSumGrad, mean_square, squared_sum
from tinymeta.testing.gradcheck import gradcheck, gradgradcheck

C_VALUES = [1.0 / 12, 1.0, 3]  # a mean over 12 values, a sum, an int constant


def composed(d, c):
    """What mse_loss recorded before: sum(d * d), then * c unless c is 1."""
    y = (d * d).sum()
    return y if c == 1 else y * c


def _d(dtype=np.float32, seed=0, shape=(4, 3)):
    rng = np.random.default_rng(seed)
    return tm.tensor(rng.standard_normal(shape).astype(dtype), requires_grad=True)


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes(), np.max(np.abs(a.astype(np.float64) - b))


@pytest.mark.parametrize("c", C_VALUES)
def test_forward_and_backward_are_the_composition_bit_for_bit(c):
    d1, d2 = _d(), _d()
    y1, y2 = squared_sum(d1, c), composed(d2, c)
    _same_bits(y1.numpy(), y2.numpy())
    y1.backward()
    y2.backward()
    _same_bits(d1.grad.numpy(), d2.grad.numpy())


@pytest.mark.parametrize("c", C_VALUES)
def test_maml_second_order_is_the_composition_bit_for_bit(c):
    # an inner gradient with create_graph, then the outer gradient through it
    def meta_gradient(loss_of):
        w = tm.tensor(
            np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(4, 3), requires_grad=True
        )
        x = tm.tensor(np.arange(12, dtype=np.float32).reshape(3, 4) / 10.0)
        (g,) = tm.grad(loss_of(w @ x - 0.3), w, create_graph=True)
        adapted = w - 0.1 * g
        outer = loss_of(adapted @ x)
        (gw,) = tm.grad(outer, w)
        return outer.numpy(), gw.numpy()

    fused = meta_gradient(lambda d: squared_sum(d, c))
    reference = meta_gradient(lambda d: composed(d, c))
    for a, b in zip(fused, reference):
        _same_bits(a, b)


def test_mean_square_is_the_mean_of_the_squares_bit_for_bit():
    d1, d2 = _d(seed=4, shape=(7, 3)), _d(seed=4, shape=(7, 3))
    y1, y2 = mean_square(d1), (d2 * d2).mean()
    _same_bits(y1.numpy(), y2.numpy())
    y1.backward()
    y2.backward()
    _same_bits(d1.grad.numpy(), d2.grad.numpy())
    empty = tm.tensor(np.zeros((0, 2), np.float32), requires_grad=True)
    with np.errstate(invalid="ignore"):  # 0 * inf, as in (d * d).mean()
        assert np.isnan(mean_square(empty).item())  # as NumPy and PyTorch: a mean over nothing


def test_the_inner_gradient_is_one_node():
    d = _d()
    (g,) = tm.grad(squared_sum(d, 0.5), d, create_graph=True)
    assert type(g.grad_fn) is SquaredSumGrad
    assert g.grad_fn.inputs[0] is d


@pytest.mark.parametrize("c", [0.25, 1.0])
@pytest.mark.parametrize("shape", [(3, 2), (5,), ()])
def test_gradients_match_finite_differences(c, shape):
    d = _d(np.float64, shape=shape)
    assert gradcheck(lambda d: squared_sum(d, c), [d])
    assert gradgradcheck(lambda d: squared_sum(d, c), [d])


@pytest.mark.parametrize("c", [0.25, 1.0])
def test_the_gradient_op_differentiates_in_both_inputs(c):
    # SquaredSumGrad's own backward (the third order of SquaredSum), both in d and in gy
    d = _d(np.float64, shape=(3, 2))
    gy = tm.tensor(np.array(1.7), requires_grad=True)
    assert gradcheck(lambda d, gy: SquaredSumGrad.apply(d, gy, c=c), [d, gy])
    assert gradgradcheck(lambda d, gy: SquaredSumGrad.apply(d, gy, c=c), [d, gy])


def test_a_changed_input_is_refused_at_backward():
    d = _d()
    y = squared_sum(d, 0.5)
    with tm.no_grad():
        d.add_(1.0)  # an optimizer step, say
    with pytest.raises(RuntimeError, match=r"SquaredSum: input 0 .* modified in place"):
        y.backward()


def test_captured_maml_step_replays_bit_identical():
    def make():
        w = tm.tensor(np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(2, 3), requires_grad=True)
        opt = tm.optim.SGD([w], lr=0.05)

        def step(x):
            (g,) = tm.grad(squared_sum(w @ x, 1.0 / 8), w, create_graph=True)
            loss = squared_sum((w - 0.1 * g) @ x, 1.0 / 8)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss

        return w, step

    rng = np.random.default_rng(3)
    batches = [tm.tensor(rng.standard_normal((3, 4)).astype(np.float32)) for _ in range(4)]
    w_eager, eager = make()
    w_captured, captured = make()
    captured = tm.capture(captured)
    for x in batches:
        _same_bits(eager(x).numpy(), captured(x).numpy())
        _same_bits(w_eager.numpy(), w_captured.numpy())
    assert captured.captures == 1


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="squared_sum: c must be a Python int or float"):
        squared_sum(_d(), np.float32(0.5))
    with pytest.raises(TypeError, match="squared_sum: d must be a floating-point tensor"):
        squared_sum(tm.tensor(np.arange(3)), 1.0)
    with pytest.raises(TypeError, match="squared_sum: d must be a Tensor"):
        squared_sum(np.ones(3), 1.0)
    assert SquaredSum(0.5).c == 0.5
