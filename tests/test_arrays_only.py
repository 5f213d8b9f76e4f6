"""Backward rules that form their gradient from arrays when nothing records (grad mode off,
no capture, no anomaly detection; ``function.arrays_only``) give bit for bit what the same
rules give through op nodes, apply no op, and are right by finite differences."""

from __future__ import annotations

import numpy as np
import pytest

import tinymeta as tm
from tinymeta import function
from tinymeta.ops.arithmetic import AddScaled
from tinymeta.testing.gradcheck import gradcheck

# Broadcasting both ways, so the rules also sum gradients back to each input's shape.
CASES = {
    "mul": (lambda a, b: a * b, (3, 1, 4), (5, 4)),
    "sub": (lambda a, b: a - b, (3, 1, 4), (5, 4)),
    "scale": (lambda a, b: 0.37 * a + b, (5, 4), (5, 4)),
    "add_scaled": (lambda a, b: AddScaled.apply(a, b, c=-0.01), (5, 4), (3, 1, 4)),
    "neg": (lambda a, b: -a * b, (5, 4), (5, 4)),
}


def _inputs(shape_a, shape_b, dtype=np.float32):
    rng = np.random.default_rng(7)
    return [
        tm.tensor(rng.standard_normal(s).astype(dtype), requires_grad=True)
        for s in (shape_a, shape_b)
    ]


def _gradients(fn, inputs, create_graph: bool):
    rng = np.random.default_rng(8)
    y = fn(*inputs)
    seed = tm.tensor(rng.standard_normal(y.shape).astype(y.dtype))
    gs = tm.grad(y, inputs, grad_outputs=seed, create_graph=create_graph)
    return [g.numpy() for g in gs]


@pytest.mark.parametrize("name", list(CASES))
def test_arrays_only_rules_equal_the_node_rules_bit_for_bit(name, monkeypatch):
    fn, shape_a, shape_b = CASES[name]
    inputs = _inputs(shape_a, shape_b)
    through_nodes = _gradients(fn, inputs, create_graph=True)  # grad mode on: op nodes
    applied = []
    real_apply = function.Function.apply.__func__

    def counting_apply(cls, *args, **params):
        applied.append(cls.__name__)
        return real_apply(cls, *args, **params)

    y = fn(*inputs)  # the forward, recorded before apply is watched
    monkeypatch.setattr(function.Function, "apply", classmethod(counting_apply))
    rng = np.random.default_rng(8)
    seed = tm.tensor(rng.standard_normal(y.shape).astype(y.dtype))
    direct = [g.numpy() for g in tm.grad(y, inputs, grad_outputs=seed)]
    assert applied == [], f"the backward pass applied {applied}"
    for g_nodes, g_direct in zip(through_nodes, direct):
        assert g_direct.dtype == np.float32
        assert np.array_equal(g_nodes, g_direct)


@pytest.mark.parametrize("name", list(CASES))
def test_arrays_only_rules_match_finite_differences(name):
    fn, shape_a, shape_b = CASES[name]
    assert gradcheck(fn, _inputs(shape_a, shape_b, np.float64), full=True, name=name)


def test_anomaly_detection_still_sees_the_ops_of_a_backward_rule():
    """With detect_anomaly on, the rules go through op nodes, so the op making an Inf inside
    Mul's backward rule is caught as it runs, before the rule returns."""
    a = tm.tensor(np.array([3e38, 1.0], dtype=np.float32), requires_grad=True)
    b = tm.tensor(np.array([2.0, 1.0], dtype=np.float32), requires_grad=True)
    y = (a * b).sum()  # finite; d/db = 10 * a overflows float32
    with pytest.raises(tm.autograd.AnomalyError) as caught, np.errstate(over="ignore"):
        with tm.autograd.detect_anomaly():
            tm.grad(y, [a, b], grad_outputs=tm.tensor(np.float32(10.0)))
    assert (caught.value.op, caught.value.phase) == ("Mul", "backward")
    assert "inside the rule, Mul ran" in str(caught.value)
