"""The eager fast paths: Linear's three ops and ReluGrad formed from arrays where nothing
records, ReLU's small-array formulas, and graph nodes that keep fewer objects (shared flag and
version tuples, no shapes for equal-shape arithmetic, no one-element output tuple). Each gives
the bits the general path gives, keeps every check, and is right by finite differences."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta import function, kernels
from tinymeta.ops.arithmetic import AddScaled, Scale
from tinymeta.testing.gradcheck import check_grads, gradcheck, gradgradcheck

# (x shape, w shape, bias?): plain, no bias, and per-task (batched) weights
LINEAR_CASES = {
    "bias": ((5, 3), (4, 3), True),
    "no_bias": ((2, 5, 3), (4, 3), False),
    "batched": ((2, 5, 3), (2, 4, 3), True),
}


def _linear_inputs(case, dtype=np.float32, seed=3):
    x_shape, w_shape, bias = LINEAR_CASES[case]
    rng = np.random.default_rng(seed)
    shapes = [x_shape, w_shape] + ([w_shape[:-1]] if bias else [])
    return [tm.tensor(rng.standard_normal(s).astype(dtype), requires_grad=True) for s in shapes]


def _mlp_loss(x, w, b=None):
    return (F.relu(F.linear(x, w, b)) ** 2).sum()


def _second_order_grads(inputs, create_graph: bool, count=None):
    """d/dinputs of |d loss / dinputs|^2: the outer pass runs the backward rules of Linear's
    gradient ops (LinearGradInput, LinearGradWeight) and of ReluGrad."""
    gs = tm.grad(_mlp_loss(*inputs), inputs, create_graph=True)
    total = sum((g * g).sum() for g in gs)
    if count is not None:
        count.clear()
    return [g.numpy() for g in tm.grad(total, inputs, create_graph=create_graph)]


@pytest.fixture
def applied(monkeypatch):
    """The names of the ops applied through Function.apply from now on."""
    names = []
    real_apply = function.Function.apply.__func__

    def counting_apply(cls, *args, **params):
        names.append(cls.__name__)
        return real_apply(cls, *args, **params)

    monkeypatch.setattr(function.Function, "apply", classmethod(counting_apply))
    return names


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_rules_from_arrays_equal_the_op_nodes_bit_for_bit(case, applied):
    inputs = _linear_inputs(case)
    through_nodes = _second_order_grads(inputs, create_graph=True)  # grad mode on: op nodes
    assert {"LinearGradInput", "LinearGradWeight", "ReluGrad"} <= set(applied)
    direct = _second_order_grads(inputs, create_graph=False, count=applied)
    # The outer backward applied no op: each rule called its ops' array functions
    assert applied == [], f"the arrays-only backward applied {applied}"
    for g_nodes, g_direct in zip(through_nodes, direct):
        assert g_direct.dtype == np.float32
        assert np.array_equal(g_nodes, g_direct)


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_rules_from_arrays_match_finite_differences(case):
    inputs = _linear_inputs(case, np.float64)
    assert gradcheck(_mlp_loss, inputs, full=True, name=f"linear {case}")
    assert gradgradcheck(_mlp_loss, inputs)


def test_linear_third_order_matches_finite_differences():
    """Third order: the rules from arrays run in the last pass, after two recorded ones."""
    assert check_grads(_mlp_loss, _linear_inputs("bias", np.float64), order=3)


def test_linear_rules_go_through_op_nodes_while_watched(applied):
    """With anomaly detection on, the rules apply their ops (so the instruments see them)."""
    inputs = _linear_inputs("bias")
    gs = tm.grad(_mlp_loss(*inputs), inputs, create_graph=True)
    total = sum((g * g).sum() for g in gs)
    applied.clear()
    with tm.autograd.detect_anomaly():
        tm.grad(total, inputs)
    assert {"LinearGradInput", "LinearGradWeight", "Linear", "ReluGrad"} <= set(applied)


MATMUL_CASES = {
    "x_wT": (lambda x, w: x @ w.T, (5, 3), (4, 3)),
    "wT_x": (lambda x, w: w.T @ x.T, (5, 3), (3, 4)),
    "batched": (lambda x, w: x @ tm.ops.swapaxes(w, -1, -2), (2, 5, 3), (2, 4, 3)),
    "broadcast": (lambda x, w: x @ w, (2, 5, 3), (3, 4)),
}


@pytest.mark.parametrize("case", list(MATMUL_CASES))
def test_matmul_and_transpose_rules_from_arrays_equal_the_op_nodes(case, applied):
    product, x_shape, w_shape = MATMUL_CASES[case]
    rng = np.random.default_rng(5)
    x, w = (
        tm.tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True)
        for s in (x_shape, w_shape)
    )
    y = product(x, w)
    seed = tm.tensor(rng.standard_normal(y.shape).astype(np.float32))
    through_nodes = [g.numpy() for g in tm.grad(y, [x, w], grad_outputs=seed, create_graph=True)]
    assert "MatMul" in applied
    applied.clear()
    direct = tm.grad(y, [x, w], grad_outputs=seed, retain_graph=True)
    assert not {"MatMul", "Transpose"} & set(applied), applied
    for g_nodes, g_direct, t in zip(through_nodes, direct, (x, w)):
        assert g_direct.shape == t.shape
        assert np.array_equal(g_nodes, g_direct.numpy())
        g_direct.data[...] = 0.0  # a gradient handed out is the caller's to change
    assert np.array_equal(tm.grad(y, [x, w], grad_outputs=seed)[0].numpy(), through_nodes[0])
    assert gradcheck(lambda x, w: product(x, w) * seed, [x, w], full=True, name=case)


RELU_VALUES = np.array([np.nan, -np.inf, -1.5, -0.0, 0.0, 2.5, np.inf], dtype=np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_relu_small_arrays_give_the_kernels_bits(dtype):
    x = np.concatenate([RELU_VALUES, -RELU_VALUES]).astype(dtype).reshape(2, 7)
    gy = np.linspace(-3.0, 3.0, x.size).astype(dtype).reshape(x.shape)
    y = F.relu(tm.tensor(x)).numpy()
    expected = kernels.relu_forward(x)
    assert y.dtype == expected.dtype
    # NaN kept where NumPy keeps it, -0.0 turned to +0.0 as np.maximum does
    assert np.array_equal(y, expected, equal_nan=True)
    assert np.array_equal(np.signbit(y), np.signbit(expected))
    xt = tm.tensor(x, requires_grad=True)
    (gx,) = tm.grad(F.relu(xt), [xt], grad_outputs=tm.tensor(gy))
    assert np.array_equal(gx.numpy(), kernels.relu_backward(gy, x), equal_nan=True)


def test_relu_gradient_of_mismatched_shapes_is_still_refused():
    """ReluGrad's forward on arrays of two shapes names them (the kernel's check)."""
    from tinymeta.ops.elementwise import ReluGrad

    gy = tm.tensor(np.ones((2, 3), np.float32))
    x = tm.tensor(np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"relu_backward.*\(2, 3\).*\(3, 2\)"):
        ReluGrad.apply(gy, x)


def test_nodes_share_flag_and_version_tuples_and_report_int_versions():
    a = tm.tensor(np.ones(3, np.float32), requires_grad=True)
    b = tm.tensor(np.ones(3, np.float32), requires_grad=True)
    c = tm.tensor(np.ones(3, np.float32))
    y1, y2, y3 = a * b, b * a, a * c
    assert y1.grad_fn.needs_input_grad is y2.grad_fn.needs_input_grad
    assert y1.grad_fn.needs_input_grad == (True, True)
    assert y3.grad_fn.needs_input_grad == (True, False)
    assert y1.grad_fn.input_versions is y2.grad_fn.input_versions
    assert [type(v) for v in y1.grad_fn.input_versions] == [int, int]
    with tm.no_grad():
        b.add_(1.0)  # invalidates what Mul saved
    with pytest.raises(RuntimeError, match=r"Mul: input 1 .*version 0 -> 1"):
        y1.sum().backward()


@pytest.mark.parametrize(
    "op", [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: AddScaled.apply(a, b, c=-0.5)]
)
def test_equal_shape_arithmetic_keeps_no_shapes_and_broadcasts_still_sum_back(op):
    rng = np.random.default_rng(0)
    a = tm.tensor(rng.standard_normal((4, 3)), requires_grad=True)
    b = tm.tensor(rng.standard_normal((4, 3)), requires_grad=True)
    row = tm.tensor(rng.standard_normal((1, 3)), requires_grad=True)
    assert op(a, b).grad_fn.shapes is None
    assert op(a, row).grad_fn.shapes == ((4, 3), (1, 3))
    for left, right in ((a, b), (a, row), (row, a)):
        assert gradcheck(op, [left, right], full=True)
        ga, gb = tm.grad(op(left, right).sum(), [left, right])
        assert (ga.shape, gb.shape) == (left.shape, right.shape)


def test_equal_shape_arithmetic_refuses_an_input_whose_data_changed_shape():
    """No shapes kept: the gradient takes the output gradient's shape, which no longer fits
    an input whose .data was replaced by one of another shape, and the engine says so."""
    a = tm.tensor(np.ones(3, np.float32), requires_grad=True)
    b = tm.tensor(np.ones(3, np.float32), requires_grad=True)
    y = (a + b).sum()
    a.data = np.ones(4, np.float32)
    with pytest.raises(RuntimeError, match=r"Add.backward produced a gradient of shape \(3,\)"):
        y.backward()


def test_outputs_of_one_and_several_output_nodes():
    x = tm.tensor(np.ones((5, 3), np.float32), requires_grad=True)
    w = tm.tensor(np.ones((4, 3), np.float32), requires_grad=True)
    b = tm.tensor(np.ones(4, np.float32), requires_grad=True)
    y = F.linear(x, w, b)
    (ref,) = y.grad_fn.outputs
    assert ref() is y and y.grad_fn.output is y
    gy = tm.tensor(np.ones((5, 4), np.float32), requires_grad=True)
    (gw,) = tm.grad(y, [w], grad_outputs=gy, create_graph=True)
    node = gw.grad_fn  # LinearGradWeight: (gw, gb)
    assert [r() is not None for r in node.outputs] == [True, False]  # gb was dropped
    assert node.output_specs == (((4, 3), np.dtype(np.float32)), ((4,), np.dtype(np.float32)))
    # A missing output gradient is built from those specs: the second order still works
    (ggy,) = tm.grad((gw * gw).sum(), [gy])
    assert ggy.shape == (5, 4)


def _tracked_objects() -> int:
    """How many objects the cyclic garbage collector tracks now (its collections run after
    every ~700 more, and a full one walks all of them)."""
    return len(gc.get_objects())


@pytest.fixture
def gc_off():
    """No collection while a test counts tracked objects (one would untrack some tuples)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()


def test_a_recorded_node_keeps_at_most_four_objects_for_the_cyclic_gc(gc_off):
    """The node, its output tensor, the output's weak reference and the inputs tuple: no
    tuples of flags, versions, shapes or output references (they made the collector run
    about twice as often in a MAML step).

    The ops are subclasses made here: CPython keeps an object's attributes without a dict
    of its own through a key table per class, and after tests/test_ops.py had run, every
    new Scale node carried a dict (one more object; Python 3.11)."""

    class FreshAddScaled(AddScaled):
        pass

    class FreshScale(Scale):
        pass

    p = tm.tensor(np.ones(8, np.float32), requires_grad=True)
    g = tm.tensor(np.ones(8, np.float32), requires_grad=True)
    n = 300
    before = _tracked_objects()
    y = p
    for _ in range(n):
        y = FreshAddScaled.apply(y, FreshScale.apply(g, c=1.0), c=-0.01)  # two nodes a step
    per_node = (_tracked_objects() - before) / (2 * n)
    assert y.grad_fn is not None
    assert per_node <= 4.05, per_node


def test_backward_frees_nodes_without_keeping_objects_for_the_cyclic_gc(gc_off):
    """Freeing a node swaps its inputs tuple for one tuple of edges (no pair per input); the
    edges still say where the node led, and a second backward is still refused."""
    a = tm.tensor(np.ones(3, np.float32), requires_grad=True)
    n = 300
    y = a
    for _ in range(n):
        y = y * a
    loss = y.sum()
    before = _tracked_objects()
    loss.backward()
    per_node = (_tracked_objects() - before) / n
    assert per_node <= 0.5, per_node
    node = y.grad_fn
    assert node.inputs is None
    (x_ref, x_creator), (a_ref, a_creator) = node.freed_edges
    assert x_ref() is None  # the product before: nothing holds it once its node is freed
    assert x_creator is not None and x_creator.op_name() == "Mul"
    assert a_ref() is a and a_creator is None
    assert node.freed_creators == (x_creator, None)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
