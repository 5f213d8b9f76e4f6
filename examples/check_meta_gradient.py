"""Plant the classic MAML bug (a missing create_graph=True) and let check_meta_grads catch it.

Run:  python examples/check_meta_gradient.py
"""

import numpy as np

import tinymeta as tm
import tinymeta.nn.functional as F
from tinymeta.testing import check_meta_grads

rng = np.random.default_rng(0)
params = {  # a 1-8-1 tanh network, in float64 (NumPy arrays keep their dtype)
    "w1": tm.tensor(rng.normal(size=(1, 8)), requires_grad=True),
    "b1": tm.tensor(np.zeros(8), requires_grad=True),
    "w2": tm.tensor(rng.normal(size=(8, 1)) / 3, requires_grad=True),
    "b2": tm.tensor(np.zeros(1), requires_grad=True),
}


def net(p, x):
    return tm.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


# Two sinusoid tasks, y = A sin(x - phase), with 10 support and 10 query points each.
amplitude, phase = rng.uniform(0.5, 3, (2, 1, 1)), rng.uniform(0, np.pi, (2, 1, 1))
x = rng.uniform(-5, 5, (2, 20, 1))
y = amplitude * np.sin(x - phase)
xs, ys, xq, yq = (tm.tensor(a) for a in (x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]))


def make_meta_loss(create_graph):
    """MAML by hand: two inner SGD steps per task, then the query loss, averaged over tasks."""

    def meta_loss(p):
        total = 0.0
        for t in range(2):
            fast = dict(p)
            for _ in range(2):
                loss = F.mse_loss(net(fast, xs[t]), ys[t])
                grads = tm.grad(loss, list(fast.values()), create_graph=create_graph)
                fast = {k: v - 0.3 * g for (k, v), g in zip(fast.items(), grads)}
            total = total + F.mse_loss(net(fast, xq[t]), yq[t])
        return total / 2

    return meta_loss


print(check_meta_grads(make_meta_loss(create_graph=False), params))  # the bug
print()
print(check_meta_grads(make_meta_loss(create_graph=True), params))  # the fix
