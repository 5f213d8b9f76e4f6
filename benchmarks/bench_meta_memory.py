"""Memory and time over many meta-iterations: after each meta-step the graph is gone.

Runs second-order sinusoid MAML (workload W1, task-vectorized) for --iterations
meta-steps and prints, every --every steps, the process's resident memory
(RSS) and the median time per iteration of the last window. Flat columns
mean nothing accumulates: no graph, no gradient, no optimizer state grows.

    python benchmarks/bench_meta_memory.py --iterations 10000
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

import tinymeta as tm
from tinymeta import meta, nn
from tinymeta.data import SinusoidTasks
from tinymeta.optim import Adam


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--inner-steps", type=int, default=1)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    model = nn.Sequential(
        nn.Linear(1, 40, rng=rng), nn.ReLU(), nn.Linear(40, 40, rng=rng), nn.ReLU(),
        nn.Linear(40, 1, rng=rng),
    )  # fmt: skip
    params = dict(model.named_parameters())
    outer = Adam(list(params.values()), lr=1e-3)
    tasks = SinusoidTasks(rng=0)

    def forward(p, x):
        return nn.functional_call(model, p, x)

    def mse(a, b):
        return ((a - b) ** 2).mean()

    print(f"{'iteration':>10} {'RSS MiB':>9} {'ms/iter':>8} {'loss':>8}")
    window = []
    for it in range(1, args.iterations + 1):
        batch = tasks.sample_batch(25, 10, 10)
        xs, ys, xq, yq = (tm.tensor(a) for a in (batch.xs, batch.ys, batch.xq, batch.yq))
        start = time.perf_counter()
        loss = meta.maml_loss(forward, params, (xs, ys), (xq, yq), mse, 0.01, args.inner_steps)
        outer.zero_grad()
        loss.backward()
        outer.step()
        window.append(time.perf_counter() - start)
        if it % args.every == 0 or it == 1:
            print(f"{it:>10} {rss_mb():>9.1f} {1000 * np.median(window):>8.2f} {loss.item():>8.3f}")
            window = []
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.1f} MiB")


if __name__ == "__main__":
    main()
