"""Graphviz DOT text of a graph (``to_dot``) and pictures made from it with ``dot`` (``render``).

See the package docstring (``tinymeta.viz``) for what the drawing shows.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tinymeta.autograd import graph as _graph

_INSTALL_HINT = (
    "the Graphviz program `dot` is not installed (or not on PATH). Install Graphviz "
    "(Debian/Ubuntu: `sudo apt install graphviz`; macOS: `brew install graphviz`; "
    "conda: `conda install graphviz`), or write the text of tm.viz.to_dot(...) to a .dot file "
    "and paste it into an online Graphviz viewer (search 'graphviz online')."
)

_FORMATS = {"svg", "png", "pdf"}


def to_dot(
    tensors,
    show_shapes: bool = True,
    show_saved: bool = False,
    params=None,
    *,
    forward=None,
    rankdir: str = "TB",
) -> str:
    """The graph behind ``tensors`` as Graphviz DOT text.

    ``tensors``      a tensor, a sequence of tensors, or a dict ``{label: tensor}``
                     (the labels name those tensors in the drawing)
    ``show_shapes``  write each tensor's shape and dtype
    ``show_saved``   write under each op what it saved for backward, and its bytes
    ``params``       names for leaves: a Module (``named_parameters()``), a dict
                     ``{name: tensor}`` or ``(name, tensor)`` pairs
    ``forward``      a tensor (or tensors) whose own graph is "the forward pass": the
                     other ops are drawn orange (the backward pass's ops, when you draw
                     gradients computed with ``create_graph=True``)
    ``rankdir``      Graphviz layout direction: "TB" (inputs on top) or "LR"

    One line per node and per edge, so the text is easy to read and test:
    ``t3 [label=...]``, ``op1 [label=...]``, ``t3 -> op1``.
    """
    roots, root_names = _graph.as_tensors(tensors)
    names = {**root_names, **_graph.param_names(params)}  # params win over dict keys
    nodes = _graph.functions(roots)
    numbers = _graph.number_tensors(nodes, roots)
    root_ids = {id(t) for t in roots}
    index_of = {id(fn): k for k, fn in enumerate(nodes)}
    forward_ops = None if forward is None else {id(f) for f in _graph.functions(forward)}

    lines = [
        "digraph tinymeta {",
        f"  rankdir={rankdir};",
        "  ordering=in;",  # draw an op's inputs left to right in argument order
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=8, arrowsize=0.6];',
    ]
    emitted: set[str] = set()

    def tensor_node(t) -> str:
        node_id = f"t{numbers[id(t)]}"
        if node_id not in emitted:
            emitted.add(node_id)
            lines.append(
                f"  {node_id} [{_tensor_attrs(t, node_id, names, root_ids, show_shapes)}];"
            )
        return node_id

    def placeholder(key: str, what: str) -> str:
        if key not in emitted:
            emitted.add(key)
            lines.append(f'  {key} [label="{_escape(what)}", shape=box, style=dotted];')
        return key

    for k, fn in enumerate(nodes):
        op_id = f"op{k}"
        in_backward = forward_ops is not None and id(fn) not in forward_ops
        lines.append(f"  {op_id} [{_op_attrs(fn, show_saved, in_backward)}];")
        edges = _graph.input_edges(fn)
        for i, (x, creator) in enumerate(edges):
            if x is not None:
                src = tensor_node(x)
            elif creator is not None and len(creator.outputs) == 1:
                src = placeholder(f"freed{index_of[id(creator)]}_0", "(freed)")
            else:
                src = placeholder(f"freed_in{k}_{i}", "(freed)")
            label = f' [label="{i}"]' if len(edges) > 1 else ""
            lines.append(f"  {src} -> {op_id}{label};")
        for j, y in enumerate(_graph.output_tensors(fn)):
            dst = tensor_node(y) if y is not None else placeholder(f"freed{k}_{j}", "(freed)")
            lines.append(f"  {op_id} -> {dst};")
    for t in roots:  # a root that is a leaf has no edges
        tensor_node(t)
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(tensors, path, **kwargs) -> Path:
    """Draw the graph behind ``tensors`` to ``path``; the suffix picks the format.

    ``.svg``, ``.png`` or ``.pdf`` run Graphviz's ``dot`` program (not a Python
    package), which must be installed: without it this raises a RuntimeError
    that says how to get it. ``.dot``/``.gv`` just write the DOT text.
    Keyword arguments go to ``to_dot``. Returns the path.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt in ("dot", "gv"):
        path.write_text(to_dot(tensors, **kwargs))
        return path
    if fmt not in _FORMATS:
        raise ValueError(
            f"render: cannot tell the format from {path.name!r}; "
            "use a .svg, .png, .pdf or .dot suffix"
        )
    dot = shutil.which("dot")
    if dot is None:
        raise RuntimeError(f"render({str(path)!r}): {_INSTALL_HINT}")
    text = to_dot(tensors, **kwargs)
    done = subprocess.run(
        [dot, f"-T{fmt}", "-o", str(path)], input=text.encode(), capture_output=True
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"render: `dot -T{fmt}` failed with code {done.returncode}: "
            f"{done.stderr.decode(errors='replace').strip()}"
        )
    return path


# --- node attributes ----------------------------------------------------------------------


def tensor_label(t, node_id: str, names: dict, show_shapes: bool = True) -> list[str]:
    """The lines of a tensor's label: its name (or ``t<k>``), then shape and dtype."""
    name = names.get(id(t)) or t.name
    lines = [name if name else node_id]
    if show_shapes:
        lines.append(f"{_graph.describe_shape(t.shape)} {t.dtype}")
    return lines


def tensor_role(t, root_ids: set) -> str:
    """``"root"`` (a tensor asked for), ``"param"`` (a leaf that requires grad),
    ``"data"`` (a leaf that does not) or ``"value"`` (made by an op)."""
    if id(t) in root_ids:
        return "root"
    if t.grad_fn is None:
        return "param" if t.requires_grad else "data"
    return "value"


def _tensor_attrs(t, node_id: str, names: dict, root_ids: set, show_shapes: bool) -> str:
    lines = tensor_label(t, node_id, names, show_shapes)
    attrs = [f'label="{_join(lines)}"', "shape=box"]
    role = tensor_role(t, root_ids)
    if role == "root":
        attrs += ["style=filled", "fillcolor=palegreen"]
    elif role == "param":
        attrs += ["style=filled", "fillcolor=lightblue"]
    elif role == "data":
        attrs += ["color=gray50", "fontcolor=gray30"]
    return ", ".join(attrs)


def _op_attrs(fn, show_saved: bool, in_backward: bool) -> str:
    lines = [fn.op_name()]
    freed = fn.inputs is None
    if freed:
        lines.append("(freed by backward)")
    elif show_saved:
        saved = _graph.saved_arrays(fn)
        if saved:
            roles = ", ".join(role for role, _ in saved)
            nbytes = _graph.unique_nbytes(a for _, a in saved)
            lines.append(f"saves {roles}: {_graph.format_bytes(nbytes)}")
        else:
            lines.append("saves nothing")
    attrs = [
        f'label="{_join(lines)}"',
        "shape=ellipse",
        'style="filled,dashed"' if freed else "style=filled",
        "fillcolor=lightsalmon" if in_backward else "fillcolor=lightgoldenrod1",
        f'tooltip="{_escape(_graph.formula(type(fn)))}"',
    ]
    return ", ".join(attrs)


def _escape(text: str) -> str:
    """Text inside a DOT double-quoted string."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _join(lines: list[str]) -> str:
    """Lines of a DOT label (``\\n`` separates them)."""
    return "\\n".join(_escape(s) for s in lines)
