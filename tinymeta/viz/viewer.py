"""``html()``: a page that steps through the backward pass of a graph, in any browser.

``viewer_data`` runs the backward pass (``tm.grad`` with ``retain_graph=True``,
so nothing is freed and no ``.grad`` is written) inside a trace that keeps
every rule's gradients, and turns what it saw into plain data: the graph's
nodes with their places (``tinymeta.viz.layout``), one record per backward
step, and the gradients accumulated at the leaves after each step. ``html``
draws the graph as SVG and puts it, with that data, into the page template
``viewer.html`` next to this file; the template's script only moves the
highlight from step to step. The page needs no network and no Graphviz.

With ``create_graph=True`` the rules' own ops are recorded too. They are drawn
in their own colour and appear at the step whose rule recorded them, so the
graph that a second backward pass would walk grows before your eyes.
"""

from __future__ import annotations

import html as _html
import json
import math
import re
from importlib import resources
from pathlib import Path

import numpy as np

from tinymeta.autograd import graph as _graph
from tinymeta.autograd.engine import grad as _grad
from tinymeta.autograd.trace import Trace
from tinymeta.backend import to_numpy
from tinymeta.tensor import Tensor
from tinymeta.viz.dot import tensor_label, tensor_role
from tinymeta.viz.layout import layered_layout

CHAR_WIDTH = 7.0  # pixels per character of a 12px sans-serif label (a generous estimate)
LINE_HEIGHT = 14.0
TENSOR_HEIGHT = 2 * LINE_HEIGHT + 6
OP_HEIGHT = LINE_HEIGHT + 11


def html(
    tensors,
    path,
    *,
    inputs=None,
    grad_outputs=None,
    create_graph: bool = False,
    params=None,
    title: str | None = None,
    max_values: int = 16,
    max_nodes: int = 400,
) -> Path:
    """Write a self-contained HTML page that steps through the backward pass of ``tensors``.

    ``tensors``       a tensor (a loss), a sequence of them, or a dict ``{label: tensor}``
    ``path``          the ``.html`` file to write (its folder must exist)
    ``inputs``        the tensors to differentiate by (default: every leaf that requires grad)
    ``grad_outputs``  the starting gradients, needed for outputs that are not scalars
    ``create_graph``  record the backward rules' ops and show them as they are recorded
    ``params``        names for leaves: a Module or ``{name: tensor}``, as in ``to_dot``
    ``max_values``    gradients with at most this many elements are shown in full;
                      larger ones by their shape and norm
    ``max_nodes``     refuse bigger graphs (the page is meant for graphs you can read)

    Open the file in a browser; the arrow keys (or the buttons) move through the
    steps. The graph is left as it was: call ``.backward()`` afterwards as usual.
    Returns the path.
    """
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"html: path must end in .html, got {path.name!r}")
    data = viewer_data(
        tensors,
        inputs=inputs,
        grad_outputs=grad_outputs,
        create_graph=create_graph,
        params=params,
        max_values=max_values,
        max_nodes=max_nodes,
    )
    if title is None:
        roots = ", ".join(r["label"] for r in data["roots"])
        title = f"Backward pass of {roots}" + (" (create_graph=True)" if create_graph else "")
    data["title"] = title
    path.write_text(page(data), encoding="utf-8")
    return path


def viewer_data(
    tensors,
    *,
    inputs=None,
    grad_outputs=None,
    create_graph: bool = False,
    params=None,
    max_values: int = 16,
    max_nodes: int = 400,
) -> dict:
    """What the page shows, as JSON-ready data (see ``html`` for the arguments).

    ``nodes``   every tensor (``t<k>``) and op (``op<k>``) drawn, numbered as ``to_dot``
                numbers them, with its label, role, layer, box (centre ``x, y``, ``w, h``)
                and ``step``: 0 for the forward graph, else the step that recorded it
    ``edges``   ``src``, ``dst``, the input index ``label`` and the SVG path ``d``
    ``roots``   the tensors the pass starts from, with their starting gradient ``seed``
    ``leaves``  the tensors differentiated by (``inputs``), with their final gradient
    ``steps``   one per backward rule, in the order the engine ran them: the op, its
                formula, ``gy`` (per output) and ``gx`` (per input), ``leaf_grads`` (the
                leaves' gradients summed so far that this step changed, by leaf ``key``)
                and ``new_ops`` (the ops this step recorded, with ``create_graph``)

    Each gradient is ``{"shape", "norm", "values" (nested lists, or None when it has
    more than max_values elements), "text"}``.
    """
    roots, root_names = _graph.as_tensors(tensors)
    if not roots:
        raise ValueError("html: tensors is empty; pass a loss (or a dict of tensors)")
    forward_nodes = _graph.functions(roots)
    if len(forward_nodes) > max_nodes:
        raise ValueError(
            f"html: the graph has {len(forward_nodes)} ops, more than max_nodes={max_nodes}; "
            "the viewer is meant for small graphs (use tm.autograd.trace() for big ones), "
            "or pass a larger max_nodes"
        )
    if inputs is None:
        inputs = _graph.leaves(roots)
        if not inputs:
            raise ValueError("html: the tensors depend on no leaf that requires grad")
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    seeds = _seeds(roots, grad_outputs)

    recorder = _Recorder()
    with recorder:
        grads = _grad(
            roots, inputs, seeds, retain_graph=True, create_graph=create_graph, allow_unused=True
        )

    # What is drawn: the tensors' graph and, with create_graph, the gradients' graphs.
    drawn = roots + ([g for g in grads if g is not None] if create_graph else [])
    nodes = _graph.functions(drawn)
    names = _Names(nodes, drawn, {**root_names, **_graph.param_names(params)})
    root_labels = [names.label(r) for r in roots]
    if create_graph:
        for g, x in zip(grads, inputs):
            if g is not None:
                names.name(g, f"d{root_labels[0]}/d{names.label(x)}")
        for s, rl in zip(seeds, root_labels):
            names.name(s, f"seed d{rl}/d{rl}")
    forward_ids = {id(fn) for fn in forward_nodes}
    recorded_at = _recorded_at(recorder.calls, nodes, forward_ids) if create_graph else {}

    drawing = _drawing(nodes, drawn, names, recorded_at, forward_ids)
    leaf_keys = {
        id(x): names.key(x) if names.drawn(x) else f"input{i}" for i, x in enumerate(inputs)
    }
    return {
        "create_graph": bool(create_graph),
        **drawing,
        "roots": [
            {"tensor": names.key(r), "label": rl, "seed": _value(s, max_values)}
            for r, s, rl in zip(roots, seeds, root_labels)
        ],
        "leaves": [
            {
                "key": leaf_keys[id(x)],
                "tensor": names.key(x) if names.drawn(x) else None,
                "label": names.label(x) if names.drawn(x) else f"input {i}",
                "shape": list(x.shape),
                "grad": None if g is None else _value(g, max_values),
            }
            for i, (x, g) in enumerate(zip(inputs, grads))
        ],
        "steps": _steps(recorder.calls, names, leaf_keys, recorded_at, max_values),
    }


class _Recorder(Trace):
    """A trace that also keeps each rule's node and gradient tensors (not only norms)."""

    def __init__(self):
        super().__init__(keep_grads=False)
        self.calls: list[tuple] = []  # (fn, gys, gxs) for each rule, in the engine's order

    def _record(self, fn, gys, gxs, seconds: float) -> None:
        super()._record(fn, gys, gxs, seconds)
        self.calls.append((fn, tuple(gys), gxs if isinstance(gxs, tuple) else (gxs,)))


class _Names:
    """Keys (``t<k>``, numbered as ``to_dot`` numbers them) and labels of the drawn tensors."""

    def __init__(self, nodes, roots, names: dict):
        self.numbers = _graph.number_tensors(nodes, roots)
        self.names = dict(names)
        self.op_keys = {id(fn): f"op{k}" for k, fn in enumerate(nodes)}

    def drawn(self, t) -> bool:
        return t is not None and id(t) in self.numbers

    def key(self, t) -> str | None:
        return f"t{self.numbers[id(t)]}" if self.drawn(t) else None

    def label(self, t) -> str:
        if t is None:
            return "(freed)"
        if not self.drawn(t):
            return "(tensor outside the graph)"
        return self.names.get(id(t)) or t.name or self.key(t)

    def name(self, t, name: str) -> None:
        """Name ``t`` unless the user already did."""
        if self.drawn(t):
            self.names.setdefault(id(t), name)


def _seeds(roots, grad_outputs) -> list:
    """The gradient each root starts with: ones for a scalar, else from ``grad_outputs``."""
    if grad_outputs is None:
        seeds = []
        for i, r in enumerate(roots):
            if r.size != 1:
                raise ValueError(
                    f"html: tensors[{i}] has shape {r.shape}; pass grad_outputs for outputs "
                    "that are not scalars"
                )
            seeds.append(Tensor(np.ones(r.shape, dtype=r.dtype)).to(r.device))
        return seeds
    seeds = list(grad_outputs) if isinstance(grad_outputs, (list, tuple)) else [grad_outputs]
    if len(seeds) != len(roots):
        raise ValueError(f"html: got {len(roots)} tensors but {len(seeds)} grad_outputs")
    return [s if isinstance(s, Tensor) else Tensor(np.asarray(s)) for s in seeds]


def _recorded_at(calls, nodes, forward_ids) -> dict[int, int]:
    """``{id(op): step}`` for the ops a ``create_graph=True`` pass recorded.

    Walking back from a step's ``gx`` and stopping at the ops already known, what is
    new was recorded by this step's rule (or by the engine adding two gradients of the
    rule's output). Sums made after the last rule (two gradients of one leaf) count for
    the last step.
    """
    drawn = {id(fn) for fn in nodes}
    known = set(forward_ids)
    step_of: dict[int, int] = {}
    for step, (_, _, gxs) in enumerate(calls, start=1):
        for fn in _graph.functions([g for g in gxs if isinstance(g, Tensor)]):
            if id(fn) not in known and id(fn) in drawn:
                step_of[id(fn)] = step
                known.add(id(fn))
    for fn in nodes:
        if id(fn) not in known:
            step_of[id(fn)] = len(calls)
    return step_of


def _steps(calls, names: _Names, leaf_keys: dict, recorded_at: dict, max_values: int) -> list:
    """One record per backward rule, and the leaves' gradients summed as the steps go."""
    new_ops: dict[int, list] = {}
    for op_id, step in recorded_at.items():
        new_ops.setdefault(step, []).append(names.op_keys[op_id])
    steps, summed = [], {}
    for step, (fn, gys, gxs) in enumerate(calls, start=1):
        outputs = _graph.output_tensors(fn)
        gy = [
            {"tensor": names.key(y), "label": names.label(y), **_value(g, max_values)}
            for y, g in zip(outputs, gys)
        ]
        gx, changed = [], {}
        for i, (x, g) in enumerate(zip(fn.inputs, gxs)):
            entry = {"tensor": names.key(x), "label": names.label(x)}
            entry["needed"] = g is not None and bool(fn.needs_input_grad[i])
            if entry["needed"]:
                entry.update(_value(g, max_values))
                if id(x) in leaf_keys:
                    a = to_numpy(g.data).astype(np.float64)
                    summed[id(x)] = summed[id(x)] + a if id(x) in summed else a
                    changed[leaf_keys[id(x)]] = _value(summed[id(x)], max_values)
            gx.append(entry)
        args = ", ".join(names.label(x) for x in fn.inputs)
        outs = ", ".join(names.label(y) for y in outputs)
        steps.append(
            {
                "index": step,
                "op": fn.op_name(),
                "node": names.op_keys.get(id(fn)),
                "call": f"{outs} = {fn.op_name()}({args})",
                "formula": _graph.formula(type(fn)),
                "generation": fn.generation,
                "gy": gy,
                "gx": gx,
                "leaf_grads": changed,
                "new_ops": sorted(new_ops.get(step, []), key=lambda k: int(k[2:])),
            }
        )
    return steps


# --- the drawing: nodes, layers, layout ---------------------------------------------------


def _drawing(nodes, roots, names: _Names, recorded_at: dict, forward_ids: set) -> dict:
    """The drawn nodes (with their boxes), edges (with their SVG paths) and the size."""
    root_ids = {id(t) for t in roots}
    info: dict[str, dict] = {}  # key -> the node's record
    tensors: dict[str, object] = {}  # key -> tensor
    edges: list[tuple] = []  # (src key, dst key, input index or None)

    def tensor_node(t, step: int) -> str:
        k = names.key(t)
        if k not in info:
            tensors[k] = t
            label = tensor_label(t, k, names.names)
            info[k] = {"id": k, "kind": "tensor", "role": tensor_role(t, root_ids)}
            info[k].update(label=label, step=step)
        return k

    for fn in nodes:
        k = names.op_keys[id(fn)]
        step = recorded_at.get(id(fn), 0)
        info[k] = {
            "id": k,
            "kind": "op",
            "role": "op" if id(fn) in forward_ids else "backward-op",
            "label": [fn.op_name()],
            "formula": _graph.formula(type(fn)),
            "generation": fn.generation,
            "step": step,
        }
        ins = _graph.input_edges(fn)
        for i, (x, _) in enumerate(ins):
            if x is None:
                raise ValueError(
                    f"html: {fn.op_name()}'s input {i} was freed by an earlier backward pass; "
                    "build the graph again (or pass retain_graph=True to that backward)"
                )
            edges.append((tensor_node(x, step), k, i if len(ins) > 1 else None))
        for y in _graph.output_tensors(fn):
            if y is not None:
                dst = tensor_node(y, step)
                info[dst]["step"] = step  # a tensor appears with the op that made it
                edges.append((k, dst, None))
    for t in roots:
        tensor_node(t, 0)

    consumers: dict[str, list] = {k: [] for k in info}
    for src, dst, _ in edges:
        consumers[src].append(dst)
    layer = _layers(nodes, names, tensors, consumers)
    for k, t in tensors.items():
        if t.grad_fn is None and consumers[k]:  # a leaf appears with its first consumer
            info[k]["step"] = min(info[c]["step"] for c in consumers[k])

    size = {}
    for k, n in info.items():
        width = max(len(s) for s in n["label"]) * CHAR_WIDTH
        size[k] = (width + 18, TENSOR_HEIGHT) if n["kind"] == "tensor" else (width + 30, OP_HEIGHT)
    order = sorted(info, key=lambda k: (layer[k], k[0] == "t", int(k.lstrip("top"))))
    lay = layered_layout(order, [(s, d) for s, d, _ in edges], layer, size)

    node_list = [
        {**info[k], "layer": layer[k], "x": lay.x[k], "y": lay.y[k], "w": lay.size[k][0],
         "h": lay.size[k][1]}
        for k in order
    ]  # fmt: skip
    return {
        "nodes": node_list,
        "edges": _edges(edges, lay),
        "width": lay.width,
        "height": lay.height,
    }


def _layers(nodes, names: _Names, tensors: dict, consumers: dict) -> dict[str, int]:
    """Rows by generation: an op of generation g in row 2g + 1, the tensors it makes in
    2g + 2 (their generation is g + 1); a leaf just above its first consumer, so that a
    parameter is drawn next to where it is used. Empty rows are dropped."""
    layer = {names.op_keys[id(fn)]: 2 * fn.generation + 1 for fn in nodes}
    for k, t in tensors.items():
        if t.grad_fn is not None:
            layer[k] = 2 * t.generation
    for k, t in tensors.items():
        if t.grad_fn is None:
            layer[k] = min((layer[c] for c in consumers[k]), default=1) - 1
    rank = {lv: r for r, lv in enumerate(sorted(set(layer.values())))}
    return {k: rank[lv] for k, lv in layer.items()}


def _edges(edges: list[tuple], lay) -> list[dict]:
    """Each edge's SVG path. Edges leave a box spread along its bottom (in the order of
    where they go) and reach an op spread along its top in argument order, so that
    ``a - b`` shows which input is which."""
    outgoing: dict = {}
    incoming: dict = {}
    for e, (src, dst, _) in enumerate(edges):
        outgoing.setdefault(src, []).append(e)
        incoming[dst] = incoming.get(dst, 0) + 1
    start_dx = {}
    for src, out in outgoing.items():
        out.sort(key=lambda e: lay.routes[e][1][0])  # by where the edge goes next
        spread = min(14.0, lay.size[src][0] * 0.6 / len(out))
        for j, e in enumerate(out):
            start_dx[e] = (j - (len(out) - 1) / 2) * spread
    result = []
    for e, ((src, dst, index), route) in enumerate(zip(edges, lay.routes)):
        n_in = incoming[dst]
        end_dx = 0.0
        if index is not None:
            end_dx = (index - (n_in - 1) / 2) * min(16.0, lay.size[dst][0] / (n_in + 1))
        (x0, y0), (x1, y1) = route[0], route[-1]
        points = [(x0 + start_dx[e], y0), *route[1:-1], (x1 + end_dx, y1)]
        result.append(
            {
                "src": src,
                "dst": dst,
                "label": index,
                "d": _path(points, lay.size[src], lay.size[dst]),
                "end": [x1 + end_dx, y1 - lay.size[dst][1] / 2],
            }
        )
    return result


def _path(points, src_size, dst_size) -> str:
    """An SVG path through ``points``, from the bottom of the source box to the top of the
    destination box, with vertical tangents (smooth where it passes a dummy)."""
    pts = list(points)
    pts[0] = (pts[0][0], pts[0][1] + src_size[1] / 2)
    pts[-1] = (pts[-1][0], pts[-1][1] - dst_size[1] / 2 - 2)  # room for the arrow head
    d = [f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        ym = (y0 + y1) / 2
        d.append(f"C{x0:.1f},{ym:.1f} {x1:.1f},{ym:.1f} {x1:.1f},{y1:.1f}")
    return " ".join(d)


# --- values -------------------------------------------------------------------------------


def _value(g, max_values: int) -> dict:
    """A gradient for the page: shape, norm, and the values when there are few."""
    if g is None:
        return {"shape": None, "norm": None, "values": None, "text": "-"}
    a = to_numpy(g.data) if isinstance(g, Tensor) else np.asarray(g)
    a64 = a.astype(np.float64)
    norm = float(np.sqrt(np.sum(np.abs(a64) ** 2)))
    if a.size <= max_values:
        values = _json_numbers(a64.tolist())
        text = _format(a64)
    else:
        values, text = None, f"norm {_num(norm)}"
    return {"shape": list(a.shape), "norm": _json_numbers(norm), "values": values, "text": text}


def _num(v: float) -> str:
    return f"{v:.6g}"


def _format(a: np.ndarray) -> str:
    if a.ndim == 0:
        return _num(float(a))
    text = np.array2string(a, separator=", ", formatter={"float_kind": _num}, max_line_width=10**6)
    return re.sub(r"\s*\n\s*", " ", text)


def _json_numbers(v):
    """Floats as JSON allows them: NaN and infinities become the strings "nan", "inf"."""
    if isinstance(v, list):
        return [_json_numbers(u) for u in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


# --- the page -----------------------------------------------------------------------------

_MARKER = re.compile(r"__TM_(TITLE|SVG|DATA)__")


def page(data: dict) -> str:
    """The HTML page for ``viewer_data``'s result (with a ``title``)."""
    template = resources.files("tinymeta.viz").joinpath("viewer.html").read_text(encoding="utf-8")
    parts = {
        "TITLE": _html.escape(data.get("title", "Backward pass")),
        "SVG": svg(data),
        # Inside <script>: "</" would end the element early.
        "DATA": json.dumps(data, allow_nan=False).replace("</", "<\\/"),
    }
    return _MARKER.sub(lambda m: parts[m.group(1)], template)


def svg(data: dict) -> str:
    """The graph as an SVG element; nodes and edges carry ids the page's script uses."""
    w, h = data["width"], data["height"]
    out = [
        f'<svg id="tm-graph" xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" '
        f'height="{h:.0f}" viewBox="0 0 {w:.0f} {h:.0f}">',
        "<defs>"
        + "".join(
            f'<marker id="arrow-{name}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" '
            f'markerHeight="8" markerUnits="userSpaceOnUse" orient="auto">'
            f'<path d="M0,0 L10,5 L0,10 z" '
            f'class="arrow-{name}"/></marker>'
            for name in ("plain", "gy", "gx")
        )
        + "</defs>",
        '<g class="edges">',
    ]
    by_id = {n["id"]: n for n in data["nodes"]}
    for k, e in enumerate(data["edges"]):
        step = max(by_id[e["src"]]["step"], by_id[e["dst"]]["step"])
        out.append(
            f'<path id="edge-{k}" class="edge" data-src="{e["src"]}" data-dst="{e["dst"]}" '
            f'data-step="{step}" d="{e["d"]}" marker-end="url(#arrow-plain)"/>'
        )
        if e["label"] is not None:  # the input's index, as in to_dot, beside the arrow head
            ex, ey = e["end"]
            dx = -7 if ex < by_id[e["dst"]]["x"] else 7
            out.append(
                f'<text class="edge-label" data-step="{step}" x="{ex + dx:.1f}" y="{ey - 7:.1f}">'
                f"{e['label']}</text>"
            )
    out.append('</g><g class="nodes">')
    for n in data["nodes"]:
        x, y, w_, h_ = n["x"], n["y"], n["w"], n["h"]
        classes = f"node {n['kind']} {n['role']}"
        attrs = (
            f'id="node-{n["id"]}" class="{classes}" data-node="{n["id"]}" data-step="{n["step"]}"'
        )
        if n["kind"] == "op":
            shape = f'<ellipse cx="{x:.1f}" cy="{y:.1f}" rx="{w_ / 2:.1f}" ry="{h_ / 2:.1f}"/>'
            tip = f"<title>{_html.escape(n['formula'])}</title>"
        else:
            shape = (
                f'<rect x="{x - w_ / 2:.1f}" y="{y - h_ / 2:.1f}" width="{w_:.1f}" '
                f'height="{h_:.1f}" rx="3"/>'
            )
            tip = f"<title>{_html.escape(n['id'])}</title>"
        lines = n["label"]
        top = y - (len(lines) - 1) * LINE_HEIGHT / 2
        text = "".join(
            f'<tspan x="{x:.1f}" y="{top + i * LINE_HEIGHT:.1f}" class="line{i}">'
            f"{_html.escape(s)}</tspan>"
            for i, s in enumerate(lines)
        )
        out.append(f'<g {attrs}>{tip}{shape}<text dominant-baseline="central">{text}</text></g>')
    out.append("</g></svg>")
    return "\n".join(out)
