"""Tests for the instruments that show backprop at work: tm.viz (DOT drawings),
tm.autograd.trace / explain, detect_anomaly and graph_memory.

Each instrument is checked against facts computed here independently of it:
the graph is walked by hand (``walk``), gradients come from closed forms or
NumPy, saved bytes from a table of what each op's rule reads. Every check
runs on graphs of first, second and third order.
"""

from __future__ import annotations

import inspect
import math
import re
import shutil
from collections import Counter

import numpy as np
import pytest

import tinymeta as tm
from tinymeta import function as function_module
from tinymeta import nn
from tinymeta.autograd import engine as engine_module
from tinymeta.function import Function
from tinymeta.tensor import Tensor

ORDERS = [1, 2, 3]


@pytest.fixture(autouse=True)
def hooks_are_off_around_every_test():
    """The instruments cost nothing when off: outside their blocks the hooks are None."""
    assert function_module._forward_hook is None
    assert engine_module._backward_hook is None
    yield
    assert function_module._forward_hook is None
    assert engine_module._backward_hook is None


# --- independent helpers ------------------------------------------------------------------


def walk(roots) -> list:
    """Every Function behind ``roots``, found by following grad_fn and inputs (or the
    freed edges a released node keeps). Written here, not imported, on purpose."""
    roots = roots if isinstance(roots, (list, tuple)) else [roots]
    found, seen = [], set()
    todo = [r.grad_fn for r in roots if r.grad_fn is not None]
    while todo:
        fn = todo.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        found.append(fn)
        if fn.inputs is not None:
            creators = [x.grad_fn for x in fn.inputs]
        else:
            creators = [c for _, c in fn.freed_edges]
        todo.extend(c for c in creators if c is not None)
    return found


def n_inputs(fn) -> int:
    return len(fn.inputs) if fn.inputs is not None else len(fn.freed_edges)


def line_of(marker: str) -> int:
    """The line number, in this file, of the line that ends with the comment ``# <marker>``."""
    source = inspect.getsource(inspect.getmodule(line_of)).splitlines()
    hits = [i + 1 for i, s in enumerate(source) if s.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, marker
    return hits[0]


def nth_derivative(f, x, n: int):
    """d^n/dx^n of sum(f(x)), elementwise for elementwise f, as a graph (create_graph=True)."""
    d = f(x)
    for _ in range(n):
        (d,) = tm.grad(d.sum(), x, create_graph=True)
    return d


def tanh_derivative(n: int, x: np.ndarray) -> np.ndarray:
    """Closed form: with t = tanh(x), d/dx p(t) = p'(t) (1 - t^2) for a polynomial p."""
    p = np.polynomial.Polynomial([0.0, 1.0])  # tanh itself, as a polynomial in t
    for _ in range(n):
        p = p.deriv() * np.polynomial.Polynomial([1.0, 0.0, -1.0])
    return p(np.tanh(x))


def mlp_loss(rng):
    """A small float64 two-layer graph: x (no grad), named parameters w1, b1, w2."""
    x = tm.tensor(rng.standard_normal((4, 3)))
    w1 = tm.tensor(rng.standard_normal((3, 5)), requires_grad=True)
    b1 = tm.tensor(rng.standard_normal(5), requires_grad=True)
    w2 = tm.tensor(rng.standard_normal((5, 2)), requires_grad=True)
    w1.name, b1.name, w2.name = "w1", "b1", "w2"
    loss = ((x @ w1 + b1).tanh() @ w2).sigmoid().sum()
    return loss, x, (w1, b1, w2)


def graph_of_order(order: int, rng):
    """(roots, leaf): a graph whose highest derivative is of the given order."""
    x = tm.tensor(rng.uniform(-1, 1, 5), requires_grad=True)
    x.name = "x"
    d = nth_derivative(lambda v: (v * 1.5).tanh(), x, order - 1)
    return [d], x


# --- a small DOT reader for the subset tm.viz writes --------------------------------------

_NODE = re.compile(r"^  (\w+) \[(.*)\];$")
_EDGE = re.compile(r"^  (\w+) -> (\w+)(?: \[(.*)\])?;$")
_ATTR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^,\s]+)')


def parse_attrs(text: str) -> dict:
    attrs = {}
    for key, value in _ATTR.findall(text or ""):
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        attrs[key] = value
    return attrs


def parse_dot(text: str) -> tuple[dict, list]:
    """(nodes {id: attrs}, edges [(src, dst, attrs)]); fails on anything unexpected."""
    lines = text.strip().splitlines()
    assert lines[0] == "digraph tinymeta {" and lines[-1] == "}"
    nodes, edges = {}, []
    for line in lines[1:-1]:
        if m := _EDGE.match(line):
            edges.append((m[1], m[2], parse_attrs(m[3])))
        elif m := _NODE.match(line):
            if m[1] in ("node", "edge"):
                continue  # default attributes
            assert m[1] not in nodes, f"node {m[1]} defined twice"
            nodes[m[1]] = parse_attrs(m[2])
        else:
            assert re.match(r"^  \w+=\w+;$", line), f"unexpected DOT line: {line!r}"
    for src, dst, _ in edges:
        assert src in nodes and dst in nodes, (src, dst)
    return nodes, edges


def check_dot_structure(text: str, roots) -> tuple[dict, list]:
    """The drawing has exactly the graph's ops, tensors in between, and one edge per
    input and per output of every op."""
    nodes, edges = parse_dot(text)
    fns = walk(roots)
    ops = {k: v for k, v in nodes.items() if k.startswith("op")}
    assert Counter(v["label"].split("\n")[0] for v in ops.values()) == Counter(
        fn.op_name() for fn in fns
    )
    assert len(edges) == sum(n_inputs(fn) + len(fn.outputs) for fn in fns)
    for src, dst, _ in edges:  # bipartite: tensor -> op -> tensor
        assert src.startswith("op") != dst.startswith("op"), (src, dst)
    # in/out degrees of each op match some Function's inputs/outputs
    degrees = Counter(
        (
            sum(1 for _, d, _ in edges if d == k),
            sum(1 for s, _, _ in edges if s == k),
            v["label"].split("\n")[0],
        )
        for k, v in ops.items()
    )
    assert degrees == Counter((n_inputs(fn), len(fn.outputs), fn.op_name()) for fn in fns)
    # one tensor node per distinct live tensor
    tensors = {id(r) for r in roots}
    for fn in fns:
        if fn.inputs is not None:
            tensors.update(id(x) for x in fn.inputs)
        else:  # freed: only the inputs something else keeps alive are still there
            tensors.update(id(ref()) for ref, _ in fn.freed_edges if ref() is not None)
        tensors.update(id(r()) for r in fn.outputs if r() is not None)
    assert sum(1 for k in nodes if k.startswith("t")) == len(tensors)
    return nodes, edges


def label_of(nodes: dict, name: str) -> dict:
    hits = [v for v in nodes.values() if v["label"].split("\n")[0] == name]
    assert len(hits) == 1, (name, hits)
    return hits[0]


# --- tm.viz -------------------------------------------------------------------------------


def test_dot_of_a_first_order_graph():
    loss, x, (w1, b1, w2) = mlp_loss(np.random.default_rng(0))
    text = tm.viz.to_dot(loss)
    nodes, _ = check_dot_structure(text, [loss])
    assert label_of(nodes, "w1")["fillcolor"] == "lightblue"  # a named leaf parameter
    assert label_of(nodes, "w1")["label"] == "w1\n(3, 5) float64"
    ops = [v["label"] for k, v in nodes.items() if k.startswith("op")]
    assert ops == ["MatMul", "Add", "Tanh", "MatMul", "Sigmoid", "Sum"]  # data-flow order
    # hovering over an op shows its formula
    tanh = next(v for v in nodes.values() if v["label"] == "Tanh")
    assert tanh["tooltip"].startswith("y = tanh(x)")


@pytest.mark.parametrize("order", ORDERS)
def test_dot_of_graphs_of_any_order(order):
    roots, x = graph_of_order(order, np.random.default_rng(order))
    nodes, _ = check_dot_structure(tm.viz.to_dot(roots), roots)
    assert label_of(nodes, "x")["fillcolor"] == "lightblue"
    if order >= 2:  # the backward rule of tanh was recorded as a node
        assert any(v["label"] == "TanhGrad" for v in nodes.values())


@pytest.mark.parametrize("order", [2, 3])
def test_dot_of_loss_and_gradient_marks_the_backward_ops(order):
    rng = np.random.default_rng(5)
    loss, x, (w1, b1, w2) = mlp_loss(rng)
    grads = [loss]
    for _ in range(order - 1):
        grads = list(tm.grad(grads[0].sum(), [w1, b1, w2], create_graph=True))
    roots = {"loss": loss, **{f"g{i}": g for i, g in enumerate(grads)}}
    text = tm.viz.to_dot(roots, forward=loss, show_saved=True)
    nodes, _ = check_dot_structure(text, list(roots.values()))
    forward_ops = {id(fn) for fn in walk(loss)}
    all_ops = walk(list(roots.values()))
    ops = [v for k, v in nodes.items() if k.startswith("op")]
    # ops are numbered like the walk sorted by generation; colour = in the loss's graph or not
    n_backward = sum(1 for fn in all_ops if id(fn) not in forward_ops)
    assert n_backward > 0
    assert sum(1 for v in ops if v["fillcolor"] == "lightsalmon") == n_backward
    assert label_of(nodes, "loss")["fillcolor"] == "palegreen"
    assert label_of(nodes, "g0")["fillcolor"] == "palegreen"


def test_dot_show_saved_writes_what_each_op_keeps():
    x = tm.tensor(np.ones((2, 3)), requires_grad=True)
    y = (x * x).exp().sum()
    nodes, _ = parse_dot(tm.viz.to_dot(y, show_saved=True))
    labels = {v["label"].split("\n")[0]: v["label"] for k, v in nodes.items() if k.startswith("op")}
    assert labels["Mul"] == "Mul\nsaves input 0, input 1: 48 B"  # one (2, 3) array, shared
    assert labels["Exp"] == "Exp\nsaves output 0: 48 B"
    assert labels["Sum"] == "Sum\nsaves nothing"


def test_dot_labels_leaves_from_params_and_roots_from_dict_keys():
    rng = np.random.default_rng(1)
    loss, x, (w1, b1, w2) = mlp_loss(rng)
    nodes, _ = parse_dot(tm.viz.to_dot({"L": loss}, params={"layer.w": w1, "layer.b": b1}))
    label_of(nodes, "layer.w")
    label_of(nodes, "layer.b")
    label_of(nodes, "w2")  # no params entry: its own name
    label_of(nodes, "L")
    nodes, _ = parse_dot(tm.viz.to_dot(loss, params=[("first", w1)], show_shapes=False))
    assert label_of(nodes, "first")["label"] == "first"


def test_dot_labels_module_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    loss = model(tm.randn(2, 3)).sum()
    nodes, _ = check_dot_structure(tm.viz.to_dot(loss, params=model), [loss])
    for name, _ in model.named_parameters():
        assert label_of(nodes, name)["fillcolor"] == "lightblue"


def test_dot_of_a_graph_freed_by_backward():
    loss, x, params = mlp_loss(np.random.default_rng(2))
    loss.backward()
    nodes, _ = check_dot_structure(tm.viz.to_dot(loss, show_saved=True), [loss])
    for k, v in nodes.items():
        if k.startswith("op"):
            assert "dashed" in v["style"] and "(freed by backward)" in v["label"]


def test_dot_escapes_names():
    x = tm.tensor([1.0], requires_grad=True)
    x.name = 'say "hi"\\'
    nodes, _ = parse_dot(tm.viz.to_dot(x * 2.0))
    label_of(nodes, 'say "hi"\\')


def test_render_explains_how_to_get_graphviz(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    x = tm.tensor([1.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="apt install graphviz") as err:
        tm.viz.render(x * 2.0, tmp_path / "g.svg")
    assert "brew install graphviz" in str(err.value) and "to_dot" in str(err.value)
    # a .dot file needs no Graphviz
    path = tm.viz.render(x * 2.0, tmp_path / "g.dot")
    parse_dot(path.read_text())
    with pytest.raises(ValueError, match="suffix"):
        tm.viz.render(x * 2.0, tmp_path / "g.jpeg2000")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
@pytest.mark.parametrize("suffix", [".svg", ".png"])
def test_render_with_graphviz(tmp_path, suffix):
    roots, _ = graph_of_order(3, np.random.default_rng(3))
    path = tm.viz.render(roots, tmp_path / f"g{suffix}")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in data


# --- trace --------------------------------------------------------------------------------


def test_trace_records_each_step_with_shapes_norms_and_bytes():
    rng = np.random.default_rng(0)
    x = tm.tensor(rng.standard_normal((4, 3)))
    w = tm.tensor(rng.standard_normal((3, 2)), requires_grad=True)
    loss = (x @ w).tanh().sum()
    with tm.autograd.trace() as tr:
        loss.backward()
    assert [s.op for s in tr] == ["Sum", "Tanh", "MatMul"]
    assert len(tr.passes) == 1 and not tr.passes[0].create_graph
    # the chain rule in NumPy
    X, W = x.numpy(), w.numpy()
    Y = np.tanh(X @ W)
    g_sum_in = np.ones_like(Y)
    g_tanh_in = g_sum_in * (1 - Y**2)
    g_w = X.T @ g_tanh_in
    s_sum, s_tanh, s_mm = tr.steps
    assert s_sum.input_shapes == ((4, 2),) and s_sum.output_shapes == ((),)
    assert s_mm.input_shapes == ((4, 3), (3, 2)) and s_mm.output_shapes == ((4, 2),)
    assert s_sum.grad_output_norms == (1.0,)
    assert s_sum.grad_input_norms[0] == pytest.approx(np.linalg.norm(g_sum_in))
    assert s_tanh.grad_output_norms[0] == pytest.approx(np.linalg.norm(g_sum_in))
    assert s_tanh.grad_input_norms[0] == pytest.approx(np.linalg.norm(g_tanh_in))
    assert s_mm.grad_input_norms[0] is None  # x needs no gradient
    assert s_mm.grad_input_norms[1] == pytest.approx(np.linalg.norm(g_w))
    np.testing.assert_allclose(w.grad.numpy(), g_w)
    # saved bytes: Sum saves nothing, Tanh its output, MatMul both inputs
    assert (s_sum.saved_bytes, s_tanh.saved_bytes, s_mm.saved_bytes) == (
        0,
        Y.nbytes,
        X.nbytes + W.nbytes,
    )
    assert tr.passes[0].saved_bytes == Y.nbytes + X.nbytes + W.nbytes
    assert all(s.seconds >= 0 for s in tr) and tr.seconds == sum(s.seconds for s in tr)
    assert [s.index for s in tr] == [0, 1, 2] and s_tanh.formula.startswith("y = tanh(x)")


def test_trace_table_and_data():
    loss, x, params = mlp_loss(np.random.default_rng(1))
    with tm.autograd.trace() as tr:
        loss.backward()
    text = tr.table()
    assert text == str(tr)
    assert "backward pass 1 of 1 (create_graph=False" in text
    for s in tr:
        assert f" {s.op} " in text
    assert len(text.splitlines()) == 2 + len(tr)
    assert tr.count_by_op() == {"MatMul": 2, "Sigmoid": 1, "Sum": 1, "Tanh": 1, "Add": 1}
    assert "steps" in repr(tr)


@pytest.mark.parametrize("order", ORDERS)
def test_trace_of_any_order_matches_the_graph_and_closed_forms(order):
    rng = np.random.default_rng(10 + order)
    x = tm.tensor(rng.uniform(-1, 1, 6), requires_grad=True)
    d = nth_derivative(tm.tanh, x, order - 1)  # the (order-1)-th derivative, as a graph
    fns = walk(d)
    inputs = {id(fn): fn.inputs for fn in fns}  # the pass below frees the nodes
    with tm.autograd.trace(keep_grads=True) as tr:
        (g,) = tm.grad(d.sum(), x)
    # one step per node (plus the final Sum), newest first
    assert len(tr) == len(fns) + 1
    assert Counter(s.node_id for s in tr.steps[1:]) == Counter(id(fn) for fn in fns)
    generations = [s.generation for s in tr]
    assert generations == sorted(generations, reverse=True)
    # the gradients the steps hand to x add up to the closed-form derivative
    total = np.zeros(6)
    for s in tr.steps[1:]:
        fn_inputs = inputs[s.node_id]
        assert s.input_shapes == tuple(tuple(t.shape) for t in fn_inputs)
        for inp, gx, norm in zip(fn_inputs, s.grad_inputs, s.grad_input_norms):
            assert (gx is None) == (norm is None)
            if gx is not None:
                assert norm == pytest.approx(np.linalg.norm(gx))
            if inp is x and gx is not None:
                total += gx
    expected = tanh_derivative(order, x.numpy())
    np.testing.assert_allclose(total, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_trace_groups_steps_by_backward_pass():
    x = tm.tensor([0.3, -0.2], requires_grad=True)
    with tm.autograd.trace() as tr:
        (g,) = tm.grad(x.tanh().sum(), x, create_graph=True)
        (h,) = tm.grad(g.sum(), x)
    assert [(p.create_graph, p.retain_graph) for p in tr.passes] == [(True, True), (False, False)]
    assert [s.pass_index for s in tr] == [0] * len(tr.passes[0].steps) + [1] * len(
        tr.passes[1].steps
    )
    assert all(s.create_graph for s in tr.passes[0].steps)
    assert not any(s.create_graph for s in tr.passes[1].steps)
    assert "backward pass 2 of 2" in str(tr)


def test_traces_nest_and_leave_results_unchanged():
    rng = np.random.default_rng(4)
    loss, x, params = mlp_loss(rng)
    plain = tm.grad(loss, params, retain_graph=True)
    with tm.autograd.trace() as outer:
        with tm.autograd.trace() as inner:
            traced = tm.grad(loss, params, retain_graph=True)
        with pytest.raises(RuntimeError, match="already open"):
            outer.__enter__()
        tm.grad(loss, params, retain_graph=True)
    for a, b in zip(plain, traced):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert len(inner) == 6 and len(outer) == 12 and len(outer.passes) == 2
    assert tm.autograd.trace().table() == "trace: no backward step was run"


def test_hooks_are_removed_when_the_block_raises():
    x = tm.tensor([1.0], requires_grad=True)
    with pytest.raises(ZeroDivisionError):
        with tm.autograd.trace(), tm.autograd.detect_anomaly():
            (x * 2.0).sum().backward()
            raise ZeroDivisionError("user code fails inside the block")
    assert function_module._forward_hook is None and engine_module._backward_hook is None


def test_a_failing_rule_leaves_the_trace_consistent():
    class Broken(Function):
        """y = x;  gx = (raises)."""

        def forward(self, x):
            return x.copy()

        def backward(self, gy):
            raise ValueError("broken rule")

    x = tm.tensor([1.0], requires_grad=True)
    with tm.autograd.trace() as tr:
        with pytest.raises(ValueError, match="broken rule"):
            Broken.apply(x).sum().backward()
    assert [s.op for s in tr] == ["Sum"]


# --- explain ------------------------------------------------------------------------------


def test_explain_prints_each_rule_in_order(capsys):
    x = tm.tensor([1.0, 2.0], requires_grad=True)
    x.name = "x"
    y = (x * x).sum()
    text = tm.autograd.explain(y)
    assert capsys.readouterr().out.strip() == text.strip()
    assert text.index("Sum: t2 = Sum(t1)") < text.index("Mul: t1 = Mul(x, x)")
    assert "rule   y = sum(x, axis)" in text and "rule   y = a * b;  ga = gy * b" in text
    assert "gx[0]  x (2,) [1., 2.]" in text  # gy * b with b = x
    assert "dt2/dx (2,) [2., 4.]" in text
    assert x.grad is None  # explain writes no .grad
    y.backward()  # and keeps the graph
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0])


@pytest.mark.parametrize("order", ORDERS)
def test_explain_graphs_of_any_order(order):
    roots, x = graph_of_order(order, np.random.default_rng(20 + order))
    text = tm.autograd.explain(roots[0].sum(), quiet=True)
    for fn in walk(roots):
        assert f"{fn.op_name()}: " in text
    if order >= 2:
        assert "rule   gx = gy * (1 - y**2), fused into one node" in text  # TanhGrad


def test_explain_refuses_big_graphs_and_names_params():
    loss, x, (w1, b1, w2) = mlp_loss(np.random.default_rng(6))
    with pytest.raises(ValueError, match="max_nodes"):
        tm.autograd.explain(loss, max_nodes=3, quiet=True)
    text = tm.autograd.explain(loss, inputs=[w2], params={"W_out": w2}, quiet=True)
    assert "gx[1]  W_out (5, 2)" in text and "/dW_out (5, 2)" in text
    assert "w1" not in text  # the path to w1 is not walked: only w2 was asked for


# --- detect_anomaly -----------------------------------------------------------------------


def test_anomaly_in_forward_names_the_op_and_the_line():
    x = tm.tensor([1.0, -1.0], requires_grad=True)
    with pytest.raises(tm.autograd.AnomalyError) as err, np.errstate(invalid="ignore"):
        with tm.autograd.detect_anomaly():
            y = x * 2.0
            z = tm.log(y)  # forward-log
            z.sum().backward()
    e = err.value
    assert isinstance(e, RuntimeError)
    assert (e.op, e.phase) == ("Log", "forward")
    assert e.where == (__file__, line_of("forward-log"))
    assert "z = tm.log(y)" in str(e) and "1 NaN of 2 values" in str(e)
    assert "y = log(x)" in str(e)  # the formula


def test_anomaly_in_forward_of_ops_that_are_not_recorded():
    with pytest.raises(tm.autograd.AnomalyError, match="Sqrt produced NaN") as err:
        with tm.autograd.detect_anomaly(), tm.no_grad(), np.errstate(invalid="ignore"):
            tm.sqrt(tm.tensor([-4.0]))
    assert err.value.phase == "forward" and err.value.function is None


def test_anomaly_in_backward_names_the_rule_and_where_the_op_was_made():
    x = tm.tensor([0.0, 4.0], requires_grad=True)
    with pytest.raises(tm.autograd.AnomalyError) as err, np.errstate(divide="ignore"):
        with tm.autograd.detect_anomaly():
            r = tm.sqrt(x)  # backward-sqrt
            loss = (r * 3.0).sum()
            loss.backward()
    e = err.value
    assert (e.op, e.phase) == ("Sqrt", "backward")  # not Div, the op inside sqrt's rule
    assert e.where == (__file__, line_of("backward-sqrt"))
    assert "r = tm.sqrt(x)" in str(e) and "Inf" in str(e) and "Div" in str(e)
    assert x.grad is None


def test_anomaly_in_a_rule_that_returns_nan_directly():
    class NanGrad(Function):
        """y = x;  gx = nan (a broken rule)."""

        def forward(self, x):
            return x.copy()

        def backward(self, gy):
            return Tensor(np.full(gy.shape, np.nan))

    x = tm.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with pytest.raises(tm.autograd.AnomalyError, match="gradient for input 0") as err:
        with tm.autograd.detect_anomaly():
            y = NanGrad.apply(x)  # nan-rule
            y.sum().backward()
    assert (err.value.op, err.value.phase) == ("NanGrad", "backward")
    assert err.value.where == (__file__, line_of("nan-rule"))
    assert "3 NaN of 3 values" in str(err.value)


@pytest.mark.parametrize("order", ORDERS)
def test_anomaly_in_backward_of_any_order(order):
    # d^k/dx^k x**(order - 1/2) is finite at 0 for k < order and infinite for k = order.
    x = tm.tensor([0.0, 1.0], requires_grad=True)
    with pytest.raises(tm.autograd.AnomalyError) as err, np.errstate(divide="ignore"):
        with tm.autograd.detect_anomaly():
            d = x ** (order - 0.5)  # power-forward
            for _ in range(order - 1):
                (d,) = tm.grad(d.sum(), x, create_graph=True)  # power-grad
            tm.grad(d.sum(), x)
    e = err.value
    assert (e.op, e.phase) == ("PowConst", "backward")
    if order == 1:
        assert e.where == (__file__, line_of("power-forward"))
    else:  # the node was made by PowConst's rule, during a create_graph=True call
        assert e.where == (__file__, line_of("power-grad"))
        assert str(e).count("was created by the backward rule of PowConst") == order - 1
    assert "d = x ** (order - 0.5)" in str(e)  # the chain ends at the forward line


def test_anomaly_mode_changes_nothing_when_all_is_finite():
    rng = np.random.default_rng(7)
    loss, x, params = mlp_loss(rng)
    plain = tm.grad(loss, params)
    loss, x, params = mlp_loss(np.random.default_rng(7))
    with tm.autograd.detect_anomaly():
        with tm.autograd.detect_anomaly():  # nesting is fine
            checked = tm.grad(loss, params)
        assert function_module._forward_hook is not None  # still on in the outer block
    for a, b in zip(plain, checked):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_anomaly_costs_nothing_outside_its_block():
    x = tm.tensor([1.0], requires_grad=True)
    with tm.autograd.detect_anomaly():
        inside = (x * 2.0).grad_fn
    outside = (x * 2.0).grad_fn
    assert hasattr(inside, "_anomaly_origin") and not hasattr(outside, "_anomaly_origin")


def test_anomaly_for_a_node_made_outside_the_block():
    x = tm.tensor([0.0], requires_grad=True)
    y = tm.sqrt(x).sum()
    with pytest.raises(tm.autograd.AnomalyError, match="outside detect_anomaly") as err:
        with tm.autograd.detect_anomaly(), np.errstate(divide="ignore"):
            y.backward()
    assert err.value.where is None and err.value.op == "Sqrt"


# --- graph_memory -------------------------------------------------------------------------

# What each op's backward rule reads, written out independently of the library:
# "in" = all its inputs, "out" = its output.
SAVES = {
    "Add": "", "Sub": "", "Neg": "", "Mul": "in", "Scale": "", "AddScaled": "", "Div": "in out",
    "PowConst": "in", "Pow": "in out", "Exp": "out", "Log": "in", "Sqrt": "out", "Sin": "in",
    "Cos": "in", "Tanh": "out", "TanhGrad": "in",
    "TanhGradGrad": "in", "Sigmoid": "out", "Relu": "in", "Abs": "in",
    "Sum": "", "Max": "in out", "Min": "in out", "MatMul": "in", "Einsum": "in",
    "Reshape": "", "Transpose": "", "BroadcastTo": "", "SumTo": "", "GetItem": "",
    "ScatterAdd": "", "Concatenate": "", "Where": "", "Maximum": "in", "Minimum": "in",
    "Clip": "in", "Cast": "", "ToDevice": "",
}  # fmt: skip


def expected_saved_bytes(roots) -> int:
    arrays = {}
    for fn in walk(roots):
        if fn.inputs is None:
            continue
        if "in" in SAVES[fn.op_name()].split():
            arrays.update((id(x.data), x.data.nbytes) for x in fn.inputs)
        if "out" in SAVES[fn.op_name()].split():
            arrays.update((id(r().data), r().data.nbytes) for r in fn.outputs)
    return sum(arrays.values())


def test_reads_output_agrees_with_the_table():
    from tinymeta.autograd.graph import reads_output

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    # (An op added later without an entry in SAVES is simply not checked here.)
    ops = [
        c
        for c in subclasses(Function)
        if c.__module__.startswith("tinymeta.ops") and c.__name__ in SAVES
    ]
    assert len(ops) >= 30
    for c in ops:
        assert reads_output(c) == ("out" in SAVES[c.__name__].split()), c.__name__
        assert c.saves_inputs == ("in" in SAVES[c.__name__].split()), c.__name__


def test_memory_counts_outputs_read_by_ops_that_do_not_declare_it():
    from tinymeta.autograd.graph import reads_output

    class Square(Function):  # no saves_output: found by reading the rule's source
        """y = x**2;  gx = 2 gy sqrt(y) sign(x) (written with the output, for the test)."""

        def forward(self, x):
            return x * x

        def backward(self, gy):
            (x,) = self.inputs
            return gy * 2.0 * self.output.sqrt() * tm.tensor(np.sign(x.data))

    class Declared(Square):
        """y = x**2, declared as not reading its output."""

        saves_output = False

    assert reads_output(Square) and not reads_output(Declared)
    x = tm.tensor(np.arange(1.0, 5.0), requires_grad=True)
    y = Square.apply(x)
    assert tm.autograd.graph_memory(y).total_bytes == x.data.nbytes + y.data.nbytes
    assert tm.autograd.graph_memory(Declared.apply(x)).total_bytes == x.data.nbytes


def test_memory_of_a_first_order_graph_by_hand():
    rng = np.random.default_rng(0)
    x = tm.tensor(rng.standard_normal((8, 4)))
    w = tm.tensor(rng.standard_normal((4, 3)), requires_grad=True)
    h = x @ w  # MatMul saves x and w
    y = h.tanh()  # Tanh saves y
    z = y * x[:, :3]  # Mul saves y (already counted) and the slice (a constant: no node)
    loss = (z.exp() + 1.0).sum()  # Exp saves its output; Add and Sum save nothing
    mem = tm.autograd.graph_memory(loss)
    slice_ = z.grad_fn.inputs[1]
    exp_out = loss.grad_fn.inputs[0].grad_fn.inputs[0]
    expected = x.data.nbytes + w.data.nbytes + y.data.nbytes + slice_.data.nbytes
    expected += exp_out.data.nbytes
    assert mem.total_bytes == expected == int(mem) == expected_saved_bytes(loss)
    assert mem.by_op["MatMul"] == x.data.nbytes + w.data.nbytes
    assert mem.by_op["Tanh"] == y.data.nbytes
    assert mem.by_op["Mul"] == slice_.data.nbytes  # y counted once, for Tanh
    assert mem.by_op["Add"] == 0 and mem.nodes == len(walk(loss)) == 6
    assert sum(mem.by_op.values()) == mem.total_bytes
    assert mem.held_bytes >= mem.total_bytes
    text = str(mem)
    assert "graph memory:" in text and "MatMul" in text and "saved" in text


@pytest.mark.parametrize("order", ORDERS)
def test_memory_of_graphs_of_any_order(order):
    rng = np.random.default_rng(30 + order)
    loss, x, params = mlp_loss(rng)
    roots = [loss]
    for _ in range(order - 1):
        roots = list(tm.grad(sum(r.sum() for r in roots), params, create_graph=True))
    mem = tm.autograd.graph_memory(roots)
    assert mem.total_bytes == expected_saved_bytes(roots)
    assert sum(o.nodes for o in mem.ops) == len(walk(roots))
    assert sum(o.bytes for o in mem.ops) == mem.total_bytes


def test_second_order_graphs_save_more_and_freed_graphs_nothing():
    rng = np.random.default_rng(8)
    loss, x, params = mlp_loss(rng)
    first = tm.autograd.graph_memory(loss)
    grads = tm.grad(loss, params, create_graph=True)
    second = tm.autograd.graph_memory([loss, *grads])
    assert second.total_bytes > first.total_bytes and "TanhGrad" in second.by_op
    loss.backward()
    assert tm.autograd.graph_memory(loss).total_bytes == 0  # backward freed the nodes
    assert tm.autograd.graph_memory(x).total_bytes == 0  # a leaf has no graph


def test_trace_saved_bytes_agree_with_graph_memory():
    loss, x, params = mlp_loss(np.random.default_rng(9))
    mem = tm.autograd.graph_memory(loss)
    with tm.autograd.trace() as tr:
        loss.backward()
    assert tr.passes[0].saved_bytes == mem.total_bytes


# --- the walkthrough ----------------------------------------------------------------------


def test_walkthrough_runs(tmp_path, capsys):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "backprop_walkthrough.py"
    argv = sys.argv
    sys.argv = [str(script), "--out", str(tmp_path)]
    try:
        with np.errstate(all="ignore"):
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    for title in ("1. The forward pass", "4. The chain rule by hand", "6. A Hessian-vector"):
        assert title in out
    worst = float(re.search(r"largest difference over all parameters: (\S+)", out)[1])
    assert worst < 1e-12
    hv_error = float(re.search(r"max \|Hv - finite difference\| = (\S+)", out)[1])
    assert hv_error < 1e-6
    assert "backward rule of Sqrt" in out
    for name in ("1_forward.dot", "5_gradient_graph.dot"):
        parse_dot((tmp_path / name).read_text())
    assert math.isfinite(worst)
