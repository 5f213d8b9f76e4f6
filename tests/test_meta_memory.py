"""After a meta-step the whole graph is gone: no node and no saved array survives,
without the garbage collector's help (no reference cycles)."""

import gc
import weakref

import numpy as np

import tinymeta as tm
from tinymeta import meta, nn
from tinymeta.data import SinusoidTasks
from tinymeta.optim import Adam


def _graph_nodes(root):
    seen, stack, nodes = set(), [root.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        nodes.append(fn)
        stack.extend(x.grad_fn for x in fn.inputs)
    return nodes


def _setup(second_order_steps=2):
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(1, 8, rng=rng), nn.ReLU(), nn.Linear(8, 1, rng=rng))
    params = dict(model.named_parameters())
    batch = SinusoidTasks(rng=0).sample_batch(4, 5, 5)
    data = [tm.tensor(a) for a in (batch.xs, batch.ys, batch.xq, batch.yq)]

    def forward(p, x):
        return nn.functional_call(model, p, x)

    def mse(a, b):
        return ((a - b) ** 2).mean()

    def meta_loss():
        xs, ys, xq, yq = data
        return meta.maml_loss(forward, params, (xs, ys), (xq, yq), mse, 0.1, second_order_steps)

    return params, meta_loss


def test_meta_step_frees_every_node_and_array_without_gc():
    params, meta_loss = _setup()
    outer = Adam(list(params.values()), lr=1e-3)
    gc.collect()
    gc.disable()
    try:
        loss = meta_loss()
        nodes = _graph_nodes(loss)
        assert len(nodes) > 30  # a real second-order graph (two inner steps, fused Linear grads)
        node_refs = [weakref.ref(fn) for fn in nodes]
        array_refs = [
            weakref.ref(x.data) for fn in nodes for x in fn.inputs if not x.is_leaf and x.ndim
        ]
        del nodes
        outer.zero_grad()
        loss.backward()
        outer.step()
        del loss
        alive_nodes = sum(r() is not None for r in node_refs)
        alive_arrays = sum(r() is not None for r in array_refs)
    finally:
        gc.enable()
    assert alive_nodes == 0
    assert alive_arrays == 0


def test_repeated_meta_steps_keep_the_same_number_of_live_objects():
    params, meta_loss = _setup()
    outer = Adam(list(params.values()), lr=1e-3)

    def step():
        outer.zero_grad()
        meta_loss().backward()
        outer.step()

    for _ in range(3):  # warm up: optimizer state, caches
        step()
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(20):
        step()
    gc.collect()
    after = len(gc.get_objects())
    assert after - before < 50
