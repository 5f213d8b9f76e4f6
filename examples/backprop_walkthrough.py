"""Backprop, step by step, on a two-layer network built from raw tensors.

    python examples/backprop_walkthrough.py              # prints everything (a few seconds)
    python examples/backprop_walkthrough.py --out graphs # also writes the backprop viewer
                                                         # (graphs/backprop.html: open it in a
                                                         # browser), .dot files, and .svg
                                                         # pictures when Graphviz is installed

1. the forward pass and its graph (tm.viz.to_dot), and what the graph saves
2. the backward pass, rule by rule (tm.autograd.explain; with --out, the same steps in the
   browser: tm.viz.html)
3. the same pass as data (tm.autograd.trace)
4. the chain rule by hand in NumPy, compared with the engine
5. the graph of a gradient (create_graph=True): the backward pass as ops
6. a Hessian-vector product: backprop through the backward pass
7. when a NaN appears (tm.autograd.detect_anomaly)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

import tinymeta as tm


def section(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def show(a) -> str:
    return np.array2string(np.asarray(a), precision=4, suppress_small=True, separator=", ")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for the viewer pages (.html), .dot files (and .svg with Graphviz)",
    )
    args = parser.parse_args(argv)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    have_dot = shutil.which("dot") is not None

    def save(name: str, tensors, **kwargs) -> None:
        """Write ``name.dot`` (and ``name.svg`` when Graphviz is installed) under --out."""
        if args.out is None:
            return
        tm.viz.render(tensors, args.out / f"{name}.dot", **kwargs)
        written = [f"{name}.dot"]
        if have_dot:
            tm.viz.render(tensors, args.out / f"{name}.svg", **kwargs)
            written.append(f"{name}.svg")
        print(f"(wrote {', '.join(str(args.out / w) for w in written)})")

    def save_viewer(name: str, loss, **kwargs) -> None:
        """Write the page that steps through the backward pass of ``loss`` under --out."""
        if args.out is None:
            return
        path = tm.viz.html(loss, args.out / f"{name}.html", **kwargs)
        print(f"(wrote {path}: open it in a browser and step with the arrow keys)")

    # --- the network: y = tanh(x W1 + b1) W2 + b2, loss = mean((y - t)^2) -----------------
    # float64, so that the hand computation and the finite differences agree to ~1e-12.
    rng = np.random.default_rng(0)
    x = tm.tensor(rng.standard_normal((4, 3)))  # 4 examples, 3 features (data: no grad)
    t = tm.tensor(rng.standard_normal((4, 1)))  # targets
    params = {
        "W1": tm.tensor(0.5 * rng.standard_normal((3, 5)), requires_grad=True),
        "b1": tm.tensor(np.zeros(5), requires_grad=True),
        "W2": tm.tensor(0.5 * rng.standard_normal((5, 1)), requires_grad=True),
        "b2": tm.tensor(np.zeros(1), requires_grad=True),
    }
    x.name, t.name = "x", "t"

    def forward(p):
        h = tm.tanh(x @ p["W1"] + p["b1"])
        y = h @ p["W2"] + p["b2"]
        loss = ((y - t) ** 2).mean()
        loss.name = "loss"
        return loss, h, y

    # --- 1 --------------------------------------------------------------------------------
    section("1. The forward pass records a graph")
    loss, h, y = forward(params)
    print(f"loss = {loss.item():.6f}")
    print(
        "Every op made a node (an ellipse below) linking its input tensors to its output.\n"
        "Paste this into a Graphviz viewer, or run with --out DIR to write it to a file:\n"
    )
    print(tm.viz.to_dot({"loss": loss}, params=params, show_saved=True))
    save("1_forward", {"loss": loss}, params=params, show_saved=True)
    print("What the graph keeps for the backward pass (the values the rules will read):")
    print(tm.autograd.graph_memory(loss))

    # --- 2 --------------------------------------------------------------------------------
    section("2. The backward pass, rule by rule")
    tm.autograd.explain(loss, params=params)  # keeps the graph; writes no .grad
    save_viewer("backprop", loss, params=params)  # the same steps, in the browser

    # --- 3 --------------------------------------------------------------------------------
    section("3. The same pass, traced")
    with tm.autograd.trace() as tr:
        loss.backward()
    print(tr)
    last = tr.steps[-1]
    print(
        f"\nThe records are data: tr.steps[-1] is a {type(last).__name__} with op={last.op!r}, "
        f"input_shapes={last.input_shapes}, grad_input_norms="
        f"{tuple(None if n is None else round(n, 4) for n in last.grad_input_norms)}"
    )

    # --- 4 --------------------------------------------------------------------------------
    section("4. The chain rule by hand (NumPy), against the engine")
    X, T = x.numpy(), t.numpy()
    W1, b1, W2, b2 = (params[k].numpy() for k in ("W1", "b1", "W2", "b2"))
    z1 = X @ W1 + b1
    H = np.tanh(z1)
    Y = H @ W2 + b2
    dY = 2 * (Y - T) / Y.size  # d mean((y - t)^2) / dy
    manual = {
        "W2": H.T @ dY,  # y = h W2 + b2  ->  dW2 = h^T dy
        "b2": dY.sum(axis=0),  # b2 was broadcast over the batch: its gradient sums over it
    }
    dH = dY @ W2.T  # dh = dy W2^T
    dZ1 = dH * (1 - H**2)  # tanh' = 1 - tanh^2
    manual["W1"] = X.T @ dZ1
    manual["b1"] = dZ1.sum(axis=0)
    worst = 0.0
    for name in ("W2", "b2", "W1", "b1"):
        engine = params[name].grad.numpy()
        diff = float(np.max(np.abs(engine - manual[name])))
        worst = max(worst, diff)
        print(f"d loss / d {name}  (max |engine - manual| = {diff:.1e})")
        print(f"  engine: {show(engine.ravel())}")
        print(f"  manual: {show(manual[name].ravel())}")
    print(f"largest difference over all parameters: {worst:.1e}")

    # --- 5 --------------------------------------------------------------------------------
    section("5. The graph of a gradient (create_graph=True)")
    loss, _, _ = forward(params)
    first = tm.autograd.graph_memory(loss)
    names = list(params)
    grads = tm.grad(loss, [params[k] for k in names], create_graph=True)
    both = {"loss": loss, **{f"dloss/d{k}": g for k, g in zip(names, grads)}}
    second = tm.autograd.graph_memory(list(both.values()))
    added = {o.op: o.nodes for o in second.ops}
    for o in first.ops:
        added[o.op] -= o.nodes
    print(
        "With create_graph=True the engine runs each backward rule with grad mode on, so the\n"
        "rules' own ops are recorded: the gradients are tensors with a graph of their own.\n"
        f"The loss alone: {first.nodes} nodes. The loss and its gradients: {second.nodes} nodes;\n"
        "the backward pass added "
        + ", ".join(f"{op} x{n}" for op, n in sorted(added.items()) if n)
        + ".\nThese ops take the forward's tensors as inputs (TanhGrad reads tanh's output, the\n"
        "MatMuls read x and h): that is the double-backward structure. It saves more:\n"
    )
    print(second)
    # forward=loss draws the ops that the backward pass recorded in orange.
    dot = tm.viz.to_dot(both, params=params, forward=loss)
    print(f"(its DOT text: {dot.count(' -> ')} edges; run with --out DIR to write it)")
    save("5_gradient_graph", both, params=params, forward=loss)
    # The same pass in the browser: each rule's own ops appear (orange) as it records them.
    save_viewer("backprop_double", loss, params=params, create_graph=True)

    # --- 6 --------------------------------------------------------------------------------
    section("6. A Hessian-vector product: backprop through the backward pass")
    v = {k: rng.standard_normal(params[k].shape) for k in names}
    # H v = d/dparams (grad . v): one more backward pass, through the gradient's graph.
    gv = sum(((g * tm.tensor(v[k])).sum() for k, g in zip(names, grads)), tm.tensor(0.0))
    with tm.autograd.trace() as tr:
        hv = tm.grad(gv, [params[k] for k in names])
    print(
        f"second-order pass: {len(tr)} backward steps "
        f"(the first-order pass had {first.nodes}); by op: {tr.count_by_op()}"
    )

    # Check against a central finite difference of gradients: Hv ~ (g(p + e v) - g(p - e v)) / 2e.
    def gradient_at(shift: float) -> list:
        moved = {k: tm.tensor(params[k].numpy() + shift * v[k], requires_grad=True) for k in names}
        loss_moved, _, _ = forward(moved)
        return [g.numpy() for g in tm.grad(loss_moved, [moved[k] for k in names])]

    eps = 1e-5
    plus, minus = gradient_at(eps), gradient_at(-eps)
    worst = 0.0
    for k, hv_k, gp, gm in zip(names, hv, plus, minus):
        fd = (gp - gm) / (2 * eps)
        diff = float(np.max(np.abs(hv_k.numpy() - fd)))
        worst = max(worst, diff)
        print(f"(H v) for {k}: {show(hv_k.numpy().ravel()[:5])}{' ...' if hv_k.size > 5 else ''}")
    print(f"max |Hv - finite difference| = {worst:.1e}")

    # --- 7 --------------------------------------------------------------------------------
    section("7. When a NaN appears")
    r = tm.tensor(np.array([0.0, 4.0]), requires_grad=True)
    try:
        with tm.autograd.detect_anomaly():
            dist = tm.sqrt(r * r).sum()  # |r|, written so that its derivative at 0 is 0/0
            dist.backward()
    except tm.autograd.AnomalyError as err:
        print(err)
    print(
        "\nsqrt'(0) = 1 / (2 sqrt(0)) is infinite; without detect_anomaly the next rule (Mul)\n"
        "would turn it into 0 * inf = NaN in r.grad, far from the line to blame. (tm.abs has a\n"
        "rule that is safe at 0.)"
    )


if __name__ == "__main__":
    with np.errstate(divide="ignore", invalid="ignore"):  # section 7 divides by zero on purpose
        main(sys.argv[1:])
