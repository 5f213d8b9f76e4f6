"""The engine's per-node walk: which outputs it keeps alive while a rule runs, the gradient
hand-off to hooks and to ``grad``'s targets, and what a failing rule leaves behind."""

from __future__ import annotations

import numpy as np
import pytest

import tinymeta as tm
from tinymeta.function import Function
from tinymeta.nn.functional_linear import LinearGradWeight
from tinymeta.testing.gradcheck import gradcheck, gradgradcheck


def f64(values, requires_grad=True) -> tm.Tensor:
    return tm.tensor(values, dtype=tm.float64, requires_grad=requires_grad)


def test_rule_reads_an_output_that_only_the_graph_kept():
    # exp's backward reads its output; nothing but the consumer node holds it, and the
    # consumer drops its inputs (retain_graph=False) before exp's rule runs.
    x = f64([0.5, -1.0, 2.0])
    loss = (tm.exp(x) * 3.0).sum()
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), 3.0 * np.exp(x.numpy()), rtol=1e-12)


class _Cube(Function):
    """y = x**3, whose rule reads self.output without declaring saves_output."""

    def forward(self, x):
        return x * x * x

    def backward(self, gy):
        (x,) = self.inputs
        return gy * 3.0 * self.output / x  # 3 x**2, from the output


def test_rule_reads_its_output_through_the_node_while_it_runs():
    x = f64([0.5, -2.0])
    loss = (_Cube.apply(x) * 2.0).sum()
    node = loss.grad_fn.inputs[0].grad_fn
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), 6.0 * x.numpy() ** 2, rtol=1e-12)
    assert node.output is None  # nothing holds the output once the pass is over


def test_multi_output_node_with_a_dropped_output_gets_a_zero_gradient():
    # LinearGradWeight has two outputs (gw, gb); only gw is used, gb is dropped before
    # backward: its gradient is zero, built from the shape the node kept.
    def gw_only(x, gy):
        gw, gb = LinearGradWeight.apply(x, gy, w_shape=(3, 4), with_bias=True)
        del gb
        return (gw * gw).sum()

    rng = np.random.default_rng(0)
    x = f64(rng.standard_normal((5, 4)))
    gy = f64(rng.standard_normal((5, 3)))
    assert gradcheck(gw_only, [x, gy])
    assert gradgradcheck(gw_only, [x, gy])


def test_hook_on_an_intermediate_output_replaces_its_gradient():
    x = f64([1.0, 2.0])
    y = x * x
    y.register_hook(lambda g: g * 10.0)
    (y * 2.0).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 10.0 * 2.0 * 2 * x.numpy())


def test_grad_of_an_intermediate_tensor_stops_there():
    x = f64([1.0, -3.0])
    h = tm.tanh(x)
    loss = (h * h).sum()
    (gh,) = tm.grad(loss, h)
    np.testing.assert_allclose(gh.numpy(), 2 * np.tanh(x.numpy()))
    assert x.grad is None


class _Broken(Function):
    """y = 2x, whose backward rule fails."""

    saves_inputs = False

    def forward(self, x):
        return x * 2.0

    def backward(self, gy):
        raise ValueError("broken rule")


class _WrongCount(_Broken):
    def backward(self, gy):
        return gy, gy


@pytest.mark.parametrize("retain_graph", [False, True])
def test_a_failing_rule_leaves_no_outputs_held(retain_graph):
    x = f64([1.0, 2.0])
    y = _Broken.apply(tm.exp(x))
    z = tm.tanh(y)  # tanh's rule runs (and holds its output) before the broken one
    loss = z.sum()
    nodes = [loss.grad_fn, z.grad_fn, y.grad_fn]
    with pytest.raises(ValueError, match="broken rule"):
        loss.backward(retain_graph=retain_graph)
    for fn in nodes:
        assert getattr(fn, "_held_outputs", None) is None, fn


def test_a_rule_with_the_wrong_number_of_gradients_is_named():
    x = f64([1.0, 2.0])
    with pytest.raises(RuntimeError, match=r"_WrongCount.backward returned 2 gradients for 1"):
        _WrongCount.apply(x).sum().backward()


def test_a_changed_saved_input_is_still_refused():
    x = f64([0.3, 0.7])
    y = x * x  # Mul saves its inputs
    with tm.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match=r"Mul: input 0 .* modified in place"):
        y.sum().backward()
