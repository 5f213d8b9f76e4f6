"""The backprop viewer's data (``tm.viz.viewer_data``) and page (``tm.viz.html``), in Python.

The values a page shows are checked against the engine computed independently
(``tm.grad`` of the loss with respect to each tensor, ``.grad`` after
``backward``); the layout against its promises (no overlapping boxes, layers
by generation, fewer crossings). tests/test_browser_viewer.py runs the page.
"""

from __future__ import annotations

import itertools
import json
import re
from importlib import resources

import numpy as np
import pytest

import tinymeta as tm
from tinymeta.autograd import graph as _graph
from tinymeta.viz.layout import _count_crossings, layered_layout


def two_layer_net(seed: int = 0):
    """loss = mean((tanh(x W1 + b1) W2 + b2 - t)^2), float64, as in the walkthrough."""
    rng = np.random.default_rng(seed)
    x = tm.tensor(rng.standard_normal((4, 3)))
    t = tm.tensor(rng.standard_normal((4, 1)))
    x.name, t.name = "x", "t"
    params = {
        "W1": tm.tensor(0.5 * rng.standard_normal((3, 5)), requires_grad=True),
        "b1": tm.tensor(0.1 * rng.standard_normal(5), requires_grad=True),
        "W2": tm.tensor(0.5 * rng.standard_normal((5, 1)), requires_grad=True),
        "b2": tm.tensor(np.zeros(1), requires_grad=True),
    }
    h = tm.tanh(x @ params["W1"] + params["b1"])
    loss = ((h @ params["W2"] + params["b2"] - t) ** 2).mean()
    loss.name = "loss"
    return loss, params


def tensors_by_key(roots) -> dict:
    """``{"t<k>": tensor}`` numbered as tm.viz numbers them."""
    roots = roots if isinstance(roots, list) else [roots]
    nodes = _graph.functions(roots)
    numbers = _graph.number_tensors(nodes, roots)
    found = {}
    for fn in nodes:
        for t in [*fn.inputs, *_graph.output_tensors(fn)]:
            found[f"t{numbers[id(t)]}"] = t
    for t in roots:
        found[f"t{numbers[id(t)]}"] = t
    return found


def assert_shows(entry: dict, expected: np.ndarray) -> None:
    """A gradient as the page holds it equals ``expected``: values when shown, else the norm."""
    assert entry["shape"] == list(expected.shape)
    np.testing.assert_allclose(entry["norm"], np.linalg.norm(expected), rtol=1e-12, atol=1e-15)
    if entry["values"] is not None:
        np.testing.assert_allclose(np.array(entry["values"]), expected, rtol=1e-12, atol=1e-15)
        shown = [float(v) for v in re.findall(r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?", entry["text"])]
        np.testing.assert_allclose(shown, expected.ravel(), rtol=1e-5, atol=1e-12)
    else:
        assert entry["text"] == f"norm {np.linalg.norm(expected):.6g}"


def test_steps_show_the_engines_gradients():
    loss, params = two_layer_net()
    data = tm.viz.viewer_data(loss, params=params, max_values=8)
    by_key = tensors_by_key(loss)
    ops = _graph.functions(loss)
    assert len(data["steps"]) == len(ops)  # every op's rule runs once
    generations = [s["generation"] for s in data["steps"]]
    assert generations == sorted(generations, reverse=True)  # newest node first

    received: dict[str, np.ndarray] = {}  # gx sent to each tensor so far
    norms_only = 0
    for step in data["steps"]:
        assert step["formula"] and step["formula"] == _graph.formula(
            type(ops[int(step["node"][2:])])
        )
        for gy in step["gy"]:
            y = by_key[gy["tensor"]]
            (expected,) = tm.grad(loss, y, retain_graph=True)
            assert_shows(gy, expected.numpy())
            if y is not loss:  # what arrives is what the consumers sent
                np.testing.assert_allclose(received[gy["tensor"]], expected.numpy(), rtol=1e-12)
            norms_only += gy["values"] is None
        for gx in step["gx"]:
            x = by_key[gx["tensor"]]
            assert gx["needed"] == x.requires_grad
            if gx["needed"]:
                assert gx["shape"] == list(x.shape)
                a = np.array(gx["values"]) if gx["values"] is not None else None
                if a is not None:
                    received[gx["tensor"]] = received.get(gx["tensor"], 0) + a
                else:  # shown by its norm only: take the engine's value for the running sum
                    (full,) = tm.grad(loss, x, retain_graph=True)
                    received[gx["tensor"]] = full.numpy()
    assert norms_only > 0  # max_values=8: the (4, 5) hidden layer is shown by its norm

    loss.backward()
    keys = {leaf["key"]: leaf for leaf in data["leaves"]}
    assert {leaf["label"] for leaf in data["leaves"]} == set(params)
    accumulated = {}
    for step in data["steps"]:
        accumulated.update(step["leaf_grads"])
    assert set(accumulated) == set(keys)
    for key, leaf in keys.items():
        grad = params[leaf["label"]].grad.numpy()
        assert_shows(leaf["grad"], grad)
        assert_shows(accumulated[key], grad)


def test_leaf_gradients_accumulate_over_steps():
    """A leaf used twice gets two contributions; the page shows the running sum."""
    w = tm.tensor(np.array([0.5, -1.0, 2.0]), requires_grad=True)
    w.name = "w"
    loss = (w * w).sum() + (3.0 * w).sum()
    data = tm.viz.viewer_data(loss)
    (key,) = [leaf["key"] for leaf in data["leaves"]]
    sums = [s["leaf_grads"][key]["values"] for s in data["steps"] if key in s["leaf_grads"]]
    assert len(sums) == 2
    loss.backward()
    np.testing.assert_allclose(sums[-1], w.grad.numpy(), rtol=1e-12)
    assert not np.allclose(sums[0], sums[-1])


def test_layout_layers_by_generation_without_overlaps():
    loss, params = two_layer_net()
    grads = tm.grad(loss, list(params.values()), create_graph=True)
    for create_graph, roots in ((False, loss), (True, [loss, *grads])):
        data = tm.viz.viewer_data(loss, params=params, create_graph=create_graph)
        nodes = {n["id"]: n for n in data["nodes"]}
        for a, b in itertools.combinations(data["nodes"], 2):
            apart_x = abs(a["x"] - b["x"]) >= (a["w"] + b["w"]) / 2
            apart_y = abs(a["y"] - b["y"]) >= (a["h"] + b["h"]) / 2
            assert apart_x or apart_y, f"{a['id']} and {b['id']} overlap"
        ops = [n for n in data["nodes"] if n["kind"] == "op"]
        for a, b in itertools.combinations(ops, 2):  # one row per generation, in order
            assert np.sign(a["y"] - b["y"]) == np.sign(a["generation"] - b["generation"])
        for e in data["edges"]:
            assert nodes[e["src"]]["layer"] < nodes[e["dst"]]["layer"]
            assert nodes[e["src"]]["y"] < nodes[e["dst"]]["y"]
        assert len(data["edges"]) == sum(
            len(fn.inputs) + len(fn.outputs) for fn in _graph.functions(roots)
        )


def test_barycenter_sweeps_remove_crossings():
    # Three chains entered in an order that crosses every pair of edges.
    nodes = ["a", "b", "c", "z", "y", "x", "p", "q", "r"]
    layer = {"a": 0, "b": 0, "c": 0, "z": 1, "y": 1, "x": 1, "p": 2, "q": 2, "r": 2}
    edges = [("a", "x"), ("b", "y"), ("c", "z"), ("x", "p"), ("y", "q"), ("z", "r"), ("a", "r")]
    size = dict.fromkeys(nodes, (40.0, 20.0))
    before = _count_crossings(
        [["a", "b", "c"], ["z", "y", "x", ("dummy", 6, 1)], ["p", "q", "r"]],
        {"a": ["x", ("dummy", 6, 1)], "b": ["y"], "c": ["z"], "x": ["p"], "y": ["q"], "z": ["r"],
         ("dummy", 6, 1): ["r"], "p": [], "q": [], "r": []},
    )  # fmt: skip
    lay = layered_layout(nodes, edges, layer, size)
    assert before > 0 and lay.crossings < before
    assert lay.crossings == _count_crossings(lay.order, _succ(lay.order, edges, layer))
    with pytest.raises(ValueError, match="edges must point to a later layer"):
        layered_layout(nodes, [("x", "a")], layer, size)


def _succ(order, edges, layer):
    """Successors in the layout's own graph (long edges through their dummies)."""
    succ = {n: [] for row in order for n in row}
    for k, (s, d) in enumerate(edges):
        chain = [s, *[("dummy", k, lv) for lv in range(layer[s] + 1, layer[d])], d]
        for a, b in zip(chain, chain[1:]):
            succ[a].append(b)
    return succ


def test_create_graph_shows_the_recorded_backward_ops():
    loss, params = two_layer_net()
    data = tm.viz.viewer_data(loss, params=params, create_graph=True)
    backward = {n["id"]: n for n in data["nodes"] if n["role"] == "backward-op"}
    forward = [n for n in data["nodes"] if n["role"] == "op"]
    assert len(forward) == len(_graph.functions(loss)) and len(backward) >= 4
    assert all(n["step"] == 0 for n in forward)
    new = [k for s in data["steps"] for k in s["new_ops"]]
    assert sorted(new) == sorted(backward) and len(new) == len(set(new))
    for s in data["steps"]:
        assert all(backward[k]["step"] == s["index"] for k in s["new_ops"])
    # The gradients are drawn as outputs, and equal the first-order ones.
    labels = {n["label"][0] for n in data["nodes"] if n["role"] == "root"}
    assert labels == {"loss", "dloss/dW1", "dloss/db1", "dloss/dW2", "dloss/db2"}
    first = tm.viz.viewer_data(loss, params=params)
    for a, b in zip(first["leaves"], data["leaves"]):
        np.testing.assert_allclose(a["grad"]["norm"], b["grad"]["norm"], rtol=1e-12)


def test_html_is_one_self_contained_file(tmp_path):
    loss, params = two_layer_net()
    path = tm.viz.html(loss, tmp_path / "backprop.html", params=params)
    text = path.read_text()
    assert re.findall(r"https?://[^\s\"']+", text) == ["http://www.w3.org/2000/svg"]
    assert "<script src" not in text and '<link rel="stylesheet"' not in text
    assert text.count("<svg") == 1 and "__TM_" not in text
    embedded = re.search(r'<script type="application/json" id="tm-data">(.*?)</script>', text, re.S)
    data = json.loads(embedded.group(1).replace("<\\/", "</"))
    assert data["title"] == "Backward pass of loss"
    assert len(data["steps"]) == len(_graph.functions(loss))
    for n in data["nodes"]:  # every node is drawn, labelled as in to_dot
        assert f'id="node-{n["id"]}"' in text
    dot = tm.viz.to_dot(loss, params=params)
    for n in data["nodes"]:
        if n["kind"] == "tensor":
            assert f'{n["id"]} [label="{n["label"][0]}\\n{n["label"][1]}"' in dot
    assert resources.files("tinymeta.viz").joinpath("viewer.html").is_file()
    assert loss.grad_fn.inputs is not None  # the graph was retained
    loss.backward()  # and can still be used


def test_non_finite_gradients_stay_valid_json(tmp_path):
    r = tm.tensor(np.array([0.0, 4.0]), requires_grad=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = tm.sqrt(r * r).sum()
        text = tm.viz.html(loss, tmp_path / "nan.html").read_text()
    embedded = re.search(r'id="tm-data">(.*?)</script>', text, re.S).group(1)
    data = json.loads(embedded, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    values = [v for s in data["steps"] for g in s["gx"] if g["needed"] for v in g["values"]]
    assert "inf" in values or "nan" in values


def test_errors_name_the_argument(tmp_path):
    w = tm.tensor(np.ones(3), requires_grad=True)
    with pytest.raises(ValueError, match="grad_outputs"):
        tm.viz.viewer_data(w * 2.0)
    with pytest.raises(ValueError, match=r"path must end in \.html"):
        tm.viz.html((w * 2.0).sum(), tmp_path / "page.svg")
    with pytest.raises(ValueError, match="max_nodes=2"):
        tm.viz.viewer_data(w.exp().sin().sum(), max_nodes=2)
    with pytest.raises(ValueError, match="no leaf that requires grad"):
        tm.viz.viewer_data(tm.tensor(np.ones(3)).sum())
    data = tm.viz.viewer_data(w * 2.0, grad_outputs=tm.tensor(np.array([1.0, 2.0, 3.0])))
    np.testing.assert_allclose(data["leaves"][0]["grad"]["values"], [2.0, 4.0, 6.0])


def test_walkthrough_writes_both_viewer_pages(tmp_path, capsys):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "backprop_walkthrough.py"
    argv, sys.argv = sys.argv, [str(script), "--out", str(tmp_path)]
    try:
        with np.errstate(all="ignore"):
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    assert f"wrote {tmp_path / 'backprop.html'}: open it in a browser" in capsys.readouterr().out
    for name, create_graph in (("backprop.html", False), ("backprop_double.html", True)):
        text = (tmp_path / name).read_text()
        embedded = re.search(r'id="tm-data">(.*?)</script>', text, re.S).group(1)
        data = json.loads(embedded.replace("<\\/", "</"))
        assert data["create_graph"] is create_graph and len(data["steps"]) == 9
        assert {leaf["label"] for leaf in data["leaves"]} == {"W1", "b1", "W2", "b2"}
        assert any(n["role"] == "backward-op" for n in data["nodes"]) is create_graph
