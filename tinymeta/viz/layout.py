"""A layered drawing of a directed acyclic graph, computed in plain Python.

The steps of the classic Sugiyama method, each kept simple:

1. **Layers** are given by the caller (for a tinymeta graph: by generation), so
   every edge points to a later layer.
2. An edge that spans several layers is cut into a chain of *dummy* nodes, one
   per layer it crosses, so that every edge joins neighbouring layers.
3. **Order within a layer**: a few barycenter sweeps (each node moves to the
   mean position of its neighbours in the layer above, then in the layer
   below), keeping the order with the fewest edge crossings seen.
4. **x coordinates**: each node is pulled towards the mean x of its
   neighbours, then pushed apart so that boxes in a layer never overlap.

Nodes are boxes ``(width, height)``; the result gives each node's centre and
each edge's route (the points it passes through, dummies included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

LAYER_GAP = 20.0  # vertical space between the boxes of neighbouring layers
NODE_GAP = 18.0  # horizontal space between neighbouring boxes in a layer
DUMMY_WIDTH = 8.0  # room kept for an edge passing through a layer
MARGIN = 16.0


@dataclass
class Layout:
    """Where everything goes. Coordinates are the centres of the boxes, in pixels."""

    x: dict  # node -> x of its centre
    y: dict  # node -> y of its centre
    size: dict  # node -> (width, height)
    layers: list  # the real nodes of each layer, left to right
    routes: list  # for each edge (src, dst): the points [(x, y), ...] it passes through
    width: float
    height: float
    crossings: int  # edge crossings between neighbouring layers in the chosen order
    order: list = field(repr=False, default_factory=list)  # each layer with its dummies

    def box(self, node) -> tuple[float, float, float, float]:
        """``(left, top, right, bottom)`` of a node's box."""
        w, h = self.size[node]
        return (
            self.x[node] - w / 2,
            self.y[node] - h / 2,
            self.x[node] + w / 2,
            self.y[node] + h / 2,
        )


def layered_layout(
    nodes: list, edges: list[tuple], layer: dict, size: dict, sweeps: int = 8
) -> Layout:
    """Lay out ``nodes`` (hashable ids) joined by ``edges`` (``(src, dst)`` pairs).

    ``layer[n]`` is the layer of each node (0 on top); every edge must go
    from a smaller layer to a larger one. ``size[n]`` is ``(width, height)``.
    """
    for src, dst in edges:
        if layer[src] >= layer[dst]:
            raise ValueError(
                f"layered_layout: edge {src!r} -> {dst!r} goes from layer {layer[src]} to "
                f"layer {layer[dst]}; edges must point to a later layer"
            )
    size = dict(size)
    level = dict(layer)
    # 2. Cut long edges into chains through dummy nodes.
    chains = []  # for each edge: the nodes it passes through, ends included
    succ: dict = {n: [] for n in nodes}
    pred: dict = {n: [] for n in nodes}
    for k, (src, dst) in enumerate(edges):
        chain = [src]
        for lv in range(level[src] + 1, level[dst]):
            dummy = ("dummy", k, lv)
            level[dummy] = lv
            size[dummy] = (DUMMY_WIDTH, 0.0)
            succ[dummy], pred[dummy] = [], []
            chain.append(dummy)
        chain.append(dst)
        for a, b in zip(chain, chain[1:]):
            succ[a].append(b)
            pred[b].append(a)
        chains.append(chain)

    n_layers = max(level.values(), default=-1) + 1
    order: list[list] = [[] for _ in range(n_layers)]
    for n in nodes:  # the caller's order first, then the dummies in edge order
        order[level[n]].append(n)
    for chain in chains:
        for d in chain[1:-1]:
            order[level[d]].append(d)

    # 3. Barycenter sweeps, keeping the best order seen.
    best = [list(o) for o in order]
    best_crossings = _count_crossings(order, succ)
    for sweep in range(sweeps):
        down = sweep % 2 == 0
        rng = range(1, n_layers) if down else range(n_layers - 2, -1, -1)
        for lv in rng:
            neighbours = pred if down else succ
            ref = order[lv - 1] if down else order[lv + 1]
            _sort_by_barycenter(order[lv], neighbours, {n: i for i, n in enumerate(ref)})
        c = _count_crossings(order, succ)
        if c < best_crossings:
            best, best_crossings = [list(o) for o in order], c
    order = best

    # 4. y by layer (each layer as tall as its tallest box), x by neighbours.
    y: dict = {}
    top = MARGIN
    for lv in range(n_layers):
        h = max((size[n][1] for n in order[lv]), default=0.0)
        for n in order[lv]:
            y[n] = top + h / 2
        top += h + LAYER_GAP
    x = _x_coordinates(order, size, succ, pred)
    left = min((x[n] - size[n][0] / 2 for n in x), default=0.0)
    for n in x:
        x[n] += MARGIN - left
    width = max((x[n] + size[n][0] / 2 for n in x), default=0.0) + MARGIN
    height = top - LAYER_GAP + MARGIN

    routes = [[(x[n], y[n]) for n in chain] for chain in chains]
    real = set(nodes)
    return Layout(
        x={n: x[n] for n in nodes},
        y={n: y[n] for n in nodes},
        size={n: size[n] for n in nodes},
        layers=[[n for n in o if n in real] for o in order],
        routes=routes,
        width=width,
        height=height,
        crossings=best_crossings,
        order=order,
    )


def _sort_by_barycenter(row: list, neighbours: dict, position: dict) -> None:
    """Sort ``row`` in place by the mean position of each node's neighbours in the
    reference layer; a node without neighbours there keeps its place."""
    scale = max(len(position), 1) / max(len(row), 1)
    keys = {}
    for i, n in enumerate(row):
        ps = [position[m] for m in neighbours[n] if m in position]
        # A node without neighbours there keeps its (scaled) index, so it stays put.
        keys[n] = sum(ps) / len(ps) if ps else i * scale
    row.sort(key=keys.__getitem__)


def _count_crossings(order: list[list], succ: dict) -> int:
    """Edge crossings between neighbouring layers (every edge joins neighbouring layers)."""
    total = 0
    for lv in range(len(order) - 1):
        below = {n: i for i, n in enumerate(order[lv + 1])}
        ends = [(i, below[m]) for i, n in enumerate(order[lv]) for m in succ[n] if m in below]
        for a in range(len(ends)):
            for b in range(a + 1, len(ends)):
                (i1, j1), (i2, j2) = ends[a], ends[b]
                if (i1 - i2) * (j1 - j2) < 0:
                    total += 1
    return total


def _x_coordinates(order, size, succ, pred, rounds: int = 6) -> dict:
    """Centres that respect each layer's order and spacing, pulled towards neighbours."""
    x: dict = {}
    for row in order:  # start packed, each layer centred on 0
        x.update(_packed(row, size))
    for r in range(rounds):
        down = r % 2 == 0
        rows = order[1:] if down else order[-2::-1]
        for row in rows:
            desired = []
            for n in row:
                ns = (pred if down else succ)[n] or (succ if down else pred)[n]
                desired.append(sum(x[m] for m in ns) / len(ns) if ns else x[n])
            x.update(_spread(row, desired, size))
    return x


def _gap(a, b, size) -> float:
    """The smallest distance between the centres of neighbours ``a`` and ``b``."""
    return (size[a][0] + size[b][0]) / 2 + NODE_GAP


def _packed(row, size) -> dict:
    out, pos = {}, 0.0
    for i, n in enumerate(row):
        if i:
            pos += _gap(row[i - 1], n, size)
        out[n] = pos
    shift = pos / 2
    return {n: v - shift for n, v in out.items()}


def _spread(row, desired, size) -> dict:
    """Positions as close to ``desired`` as the spacing allows: the mean of a placement
    pushed rightwards and one pushed leftwards (both keep the spacing, so their mean does)."""
    if not row:
        return {}
    right = list(desired)
    for i in range(1, len(row)):
        right[i] = max(right[i], right[i - 1] + _gap(row[i - 1], row[i], size))
    left = list(desired)
    for i in range(len(row) - 2, -1, -1):
        left[i] = min(left[i], left[i + 1] - _gap(row[i], row[i + 1], size))
    return {n: (a + b) / 2 for n, a, b in zip(row, right, left)}
