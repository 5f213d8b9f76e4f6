"""Drawing graphs.

* ``html(loss, "backprop.html")`` writes one self-contained page that steps
  through the backward pass (the graph as SVG; no network, no Graphviz).
* ``to_dot`` writes Graphviz DOT text, ``render`` turns it into a picture.

The drawing has one node per tensor (boxes) and one per op (ellipses), with
edges in data-flow order: input tensor -> op -> output tensor. Colours:

* light blue   leaves that require grad (parameters, inputs you differentiate by)
* grey text    leaves that do not (data, constants)
* green        the tensors you asked to draw (a loss, a gradient)
* yellow       ops; with ``forward=loss``, ops outside the loss's own graph are
               orange: those a ``create_graph=True`` backward pass recorded
* dashed       a node freed by a backward pass (it kept only where its edges led)

An op with several inputs numbers its input edges (0, 1, ...) so that
``a / b`` and ``b / a`` look different; hovering over an op in an SVG shows
its formula. Leaves are labelled with their names: from ``params=`` (a
Module or ``{name: tensor}``), else ``tensor.name``; other tensors are
numbered ``t0, t1, ...`` in forward order, the same numbers
``tm.autograd.explain`` uses.

A gradient computed with ``create_graph=True`` is a tensor with a graph like
any other: draw it to see the backward pass as ops (``TanhGrad``,
``BroadcastTo``, ...) that reach back into the forward's tensors.

    import tinymeta as tm
    w = tm.randn(3, 2, requires_grad=True)
    w.name = "w"
    loss = (tm.randn(4, 3) @ w).tanh().sum()
    print(tm.viz.to_dot(loss))                       # paste into any Graphviz viewer
    (g,) = tm.grad(loss, w, create_graph=True)
    tm.viz.render({"loss": loss, "dloss/dw": g}, "graph.svg", forward=loss)  # needs `dot`
    tm.viz.html(loss, "backprop.html")               # open it in a browser
"""

from tinymeta.viz.dot import render, to_dot
from tinymeta.viz.viewer import html, viewer_data

__all__ = ["html", "render", "to_dot", "viewer_data"]
