"""``graph_memory``: how many bytes a recorded graph keeps for its backward pass.

A backward rule needs some of the forward's values: ``Mul`` needs both
factors, ``MatMul`` both matrices, ``Tanh`` its output (``1 - y**2``), while
``Add`` or ``Reshape`` need only shapes. Those *saved* arrays stay in memory
until backward runs (or the graph is dropped). That is the price of reverse
mode, and it grows with the order of the derivative: a graph built with
``create_graph=True`` (second-order MAML) holds the forward's saved arrays
*and* those of every backward rule, which saves more (``TanhGrad`` keeps y and
the incoming gradient), so it costs a multiple of the first-order graph.

    import tinymeta as tm
    x = tm.randn(64, 32)
    w = tm.randn(32, 32, requires_grad=True)
    loss = (x @ w).tanh().sum()
    print(tm.autograd.graph_memory(loss))
    (g,) = tm.grad(loss, w, create_graph=True)
    print(tm.autograd.graph_memory([loss, g]))     # the gradient's graph saves more
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tinymeta.autograd import graph as _graph


@dataclass
class OpMemory:
    """What the nodes of one op type save."""

    op: str
    nodes: int = 0  # how many nodes of this op the graph has
    arrays: int = 0  # saved arrays first counted for this op
    bytes: int = 0  # their nbytes


@dataclass
class GraphMemory:
    """The result of ``graph_memory``; ``str()`` prints a table.

    ``total_bytes``      bytes of the saved arrays, each array counted once
                         even when several nodes save it (a shared input).
    ``ops``              one ``OpMemory`` per op type, most bytes first. An
                         array saved by several nodes counts for the oldest
                         one, so the ``bytes`` add up to ``total_bytes``.
    ``held_bytes``       bytes of every array the graph's nodes keep alive,
                         saved or not. In tinymeta a node holds all of its
                         input tensors until backward frees it (even an Add,
                         whose rule needs only shapes), so this is what
                         keeping the graph really costs; it is at least
                         ``total_bytes``.
    """

    total_bytes: int
    ops: list[OpMemory] = field(default_factory=list)
    nodes: int = 0
    arrays: int = 0
    held_bytes: int = 0

    @property
    def by_op(self) -> dict[str, int]:
        """``{op name: saved bytes}``, most bytes first."""
        return {o.op: o.bytes for o in self.ops}

    def __int__(self) -> int:
        return self.total_bytes

    def __str__(self) -> str:
        fmt = _graph.format_bytes
        head = (
            f"graph memory: {fmt(self.total_bytes)} saved for backward "
            f"({self.arrays} arrays, {self.nodes} nodes)"
        )
        rows = [
            [
                o.op,
                str(o.nodes),
                str(o.arrays),
                fmt(o.bytes),
                f"{100 * o.bytes / self.total_bytes:.0f}%" if self.total_bytes else "-",
            ]
            for o in self.ops
        ]
        table = _graph.format_table(
            ["op", "nodes", "arrays", "saved", "share"], rows, right={1, 2, 3, 4}
        )
        tail = (
            f"all arrays the nodes hold (saved or not): {fmt(self.held_bytes)}"
            if self.held_bytes != self.total_bytes
            else ""
        )
        return "\n".join(s for s in (head, table, tail) if s)


def graph_memory(tensors) -> GraphMemory:
    """Bytes that the graph behind ``tensors`` saves for backward, in total and by op type.

    ``tensors``: a tensor, a sequence of tensors or a dict of them (e.g. a
    loss and the gradients computed from it with ``create_graph=True``).
    What counts as saved is what each op's backward rule reads: its inputs
    when ``saves_inputs`` is set, its output when ``saves_output`` is (see
    ``graph.reads_output``). Nodes already freed by a backward pass hold nothing.
    Arrays count by ``nbytes``; two tensors that share one array object (a
    ``detach()``) count once, while views of one buffer count separately.
    """
    nodes = _graph.functions(tensors)
    rows: dict[str, OpMemory] = {}
    counted: set[int] = set()
    held = []
    for fn in nodes:
        row = rows.setdefault(fn.op_name(), OpMemory(fn.op_name()))
        row.nodes += 1
        for _, array in _graph.saved_arrays(fn):
            held.append(array)
            if id(array) in counted:
                continue
            counted.add(id(array))
            row.arrays += 1
            row.bytes += array.nbytes
        if fn.inputs is not None:
            held.extend(x.data for x in fn.inputs)
    ops = sorted(rows.values(), key=lambda o: (-o.bytes, o.op))
    return GraphMemory(
        total_bytes=sum(o.bytes for o in ops),
        ops=ops,
        nodes=len(nodes),
        arrays=len(counted),
        held_bytes=_graph.unique_nbytes(held),
    )
