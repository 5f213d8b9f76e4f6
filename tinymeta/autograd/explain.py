"""``explain(loss)``: the backward pass of a small graph, told step by step.

Reverse mode applies the chain rule one node at a time, newest node first.
Each node's *backward rule* receives ``gy`` (d loss / d output) and returns
``gx`` (d loss / d input) for each input; the rule is written in the op's
docstring, next to the forward formula. ``explain`` runs the backward pass
inside ``trace(keep_grads=True)`` and prints, for each step, the node, its
rule and the gradients that went in and out:

    import tinymeta as tm
    x = tm.tensor([1.0, 2.0], requires_grad=True)
    x.name = "x"
    y = (x * x).sum()
    tm.autograd.explain(y)
    # step 1  Sum: t2 = Sum(t1)
    #         rule  y = sum(x, axis);  gx = broadcast gy back over the summed axes.
    #         gy    t2 ()    1
    #         gx    t1 (2,)  [1, 1]
    # step 2  Mul: t1 = Mul(x, x)
    #         ...

The graph is kept (``retain_graph=True``) and nothing is written to
``.grad``, so you can still call ``loss.backward()`` afterwards. Tensor names
(``t1``) are the ones ``tm.viz.to_dot`` draws for the same graph.
"""

from __future__ import annotations

import sys

import numpy as np

from tinymeta.autograd import graph as _graph
from tinymeta.autograd.engine import grad as _grad
from tinymeta.autograd.trace import trace

_SHOW_VALUES_UP_TO = 8  # elements: larger gradients are shown by their norm


def explain(
    loss,
    inputs=None,
    grad_output=None,
    *,
    params=None,
    max_nodes: int = 40,
    quiet: bool = False,
    file=None,
) -> str:
    """Print (unless ``quiet``) and return the backward pass of ``loss``, step by step.

    ``inputs``       the tensors to differentiate by (default: every leaf that requires grad)
    ``grad_output``  the starting gradient, needed when ``loss`` is not a scalar
    ``params``       names for leaves, as in ``tm.viz.to_dot``
    ``max_nodes``    refuse bigger graphs (use ``trace()`` for those)
    ``file``         where to print (default: ``sys.stdout``)
    """
    nodes = _graph.functions(loss)
    if len(nodes) > max_nodes:
        raise ValueError(
            f"explain: the graph has {len(nodes)} nodes, more than max_nodes={max_nodes}; "
            "explain is meant for small graphs. Use `with tm.autograd.trace() as tr:` for big "
            "ones, or pass a larger max_nodes"
        )
    if inputs is None:
        inputs = _graph.leaves(loss)
        if not inputs:
            raise ValueError("explain: the loss depends on no leaf that requires grad")
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]

    label = _Labels(nodes, loss, params)
    with trace(keep_grads=True) as tr:
        grads = _grad(loss, inputs, grad_output, retain_graph=True, allow_unused=True)

    by_id = {id(fn): fn for fn in nodes}
    out = [
        f"Backward pass of {label(loss)} (shape {_graph.describe_shape(loss.shape)}): "
        f"{len(tr.steps)} step{'' if len(tr.steps) == 1 else 's'}, newest node first.",
        "Each step applies one op's backward rule: gy is the gradient of the loss with "
        "respect to the op's output, gx with respect to each input (the chain rule).",
        "",
    ]
    for n, step in enumerate(tr.steps, start=1):
        fn = by_id[step.node_id]
        args = ", ".join(label(x) for x in fn.inputs)
        outs = ", ".join(label(y) for y in _graph.output_tensors(fn))
        out.append(f"step {n}  {step.op}: {outs} = {step.op}({args})")
        out.append(f"        rule   {step.formula}")
        outputs = _graph.output_tensors(fn)
        for j, (y, g) in enumerate(zip(outputs, step.grad_outputs)):
            out.append(f"        {_slot('gy', j, len(outputs))}{label(y)} {_value(g)}")
        for i, (x, g) in enumerate(zip(fn.inputs, step.grad_inputs)):
            shown = _value(g) if g is not None else "not needed (nothing behind it requires grad)"
            out.append(f"        {_slot('gx', i, len(fn.inputs))}{label(x)} {shown}")
        out.append("")
    out.append(f"Gradients of {label(loss)}:")
    for x, g in zip(inputs, grads):
        shown = _value(g.numpy()) if g is not None else "None (the loss does not depend on it)"
        out.append(f"  d{label(loss)}/d{label(x)} {shown}")
    text = "\n".join(out)
    if not quiet:
        print(text, file=file if file is not None else sys.stdout)
    return text


class _Labels:
    """Names of tensors: the user's (params=, t.name) or t<k> as tm.viz numbers them."""

    def __init__(self, nodes, loss, params):
        self.numbers = _graph.number_tensors(nodes, [loss])
        self.names = _graph.param_names(params)

    def __call__(self, t) -> str:
        if t is None:
            return "(freed)"
        name = self.names.get(id(t)) or t.name
        if name:
            return name
        k = self.numbers.get(id(t))
        return f"t{k}" if k is not None else "(tensor outside the graph)"


def _slot(g: str, i: int, n: int) -> str:
    """``gx     `` for a single input, ``gx[1]  `` for one of several."""
    return f"{g}[{i}]".ljust(7) if n > 1 else g.ljust(7)


def _value(a) -> str:
    """``(shape) values`` for a small array, ``(shape) norm ...`` for a big one."""
    shape = _graph.describe_shape(a.shape)
    if a.size <= _SHOW_VALUES_UP_TO:
        body = np.array2string(
            np.asarray(a).reshape(-1), precision=4, separator=", ", suppress_small=True
        )
        return f"{shape} {body if a.ndim else body[1:-1]}"
    return f"{shape} norm {float(np.linalg.norm(np.asarray(a, dtype=np.float64))):.4g}"
