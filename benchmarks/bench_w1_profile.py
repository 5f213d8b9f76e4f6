"""W1 (sinusoid MAML meta-iteration) on the CPU, tinymeta only: time, op counts, profile.

W1 of benchmarks/README.md: MLP 1-40-40-1 (ReLU), 25 tasks run as one batched
computation (per-task weights along a leading task axis), K=10 support and 10
query points, inner SGD (lr 0.01) on MSE, Adam outer step (lr 1e-3). Three
variants: second order with 1 and with 5 inner steps, and first order with 1.

For each variant it prints the median time of a whole meta-iteration (meta-loss,
backward, Adam step), the number of ops applied per meta-iteration (forward and
inside backward rules) and how many of them were recorded as graph nodes, by op.
``--profile N`` runs cProfile over N meta-iterations of the first variant.

    python benchmarks/bench_w1_profile.py --threads 1 --clock cpu --repeats 200
    python benchmarks/bench_w1_profile.py --threads 1 --profile 300 --only 2nd-1
    # an older tinymeta (e.g. `git archive <commit>` unpacked in /tmp/old), back to back:
    python benchmarks/bench_w1_profile.py --threads 1 --tinymeta /tmp/old

The PyTorch comparison lives in its own script; this one is for finding and
checking tinymeta's own overhead.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    OUTER_LR,
    W1_LR,
    W1_TASKS,
    base_parser,
    describe_machine,
    median,
    noise_warning,
    setup_threads,
    spread,
    time_interleaved,
    w1_data,
    w1_weights,
)

# name -> (inner steps, first order)
VARIANTS = {"2nd-1": (1, False), "2nd-5": (5, False), "1st-1": (1, True)}


def make_step(tm, np, steps: int, first_order: bool):
    """One W1 meta-iteration as a function of nothing (it updates its own parameters)."""
    import tinymeta.nn.functional as F
    from tinymeta import meta
    from tinymeta.optim import Adam

    params = {k: tm.tensor(v, requires_grad=True) for k, v in w1_weights(np).items()}
    xs, ys, xq, yq = (tm.tensor(a) for a in w1_data(np))
    opt = Adam(list(params.values()), lr=OUTER_LR)

    def mlp(p, x):
        h = F.relu(F.linear(x, p["w1"], p["b1"]))
        h = F.relu(F.linear(h, p["w2"], p["b2"]))
        return F.linear(h, p["w3"], p["b3"])

    def step():
        loss = meta.maml_loss(
            mlp, params, (xs, ys), (xq, yq), F.mse_loss, W1_LR, steps, first_order=first_order
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return step


def count_ops(step) -> tuple[Counter, Counter]:
    """(ops applied, ops recorded as nodes) in one call of ``step``, by op name."""
    from tinymeta import function

    applied, recorded = Counter(), Counter()

    def hook(fn, outputs):
        applied[fn.op_name()] += 1
        if fn.inputs is not None:
            recorded[fn.op_name()] += 1

    previous = function._forward_hook
    function._forward_hook = hook
    try:
        step()
    finally:
        function._forward_hook = previous
    return applied, recorded


def top(counter: Counter, n: int = 10) -> str:
    return ", ".join(f"{name} {k}" for name, k in counter.most_common(n))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], repeats=200, warmup=20)
    parser.add_argument("--only", choices=list(VARIANTS), action="append", help="variant(s)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile N steps")
    parser.add_argument("--tinymeta", default=None, help="import tinymeta from this source tree")
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    if args.tinymeta:
        sys.path.insert(0, str(Path(args.tinymeta).resolve()))

    import numpy as np

    import tinymeta as tm

    names = args.only or list(VARIANTS)
    print(f"W1 sinusoid MAML, {W1_TASKS} tasks task-vectorized; tinymeta from {tm.__file__}")
    print(describe_machine(threads, args.clock))
    fns = {name: make_step(tm, np, *VARIANTS[name]) for name in names}

    print("\nops per meta-iteration (applied = forward + inside backward rules; nodes = recorded)")
    for name, step in fns.items():
        step()  # the first call may differ (lazy kernels, first Adam step)
        applied, recorded = count_ops(step)
        print(f"  {name}: {sum(applied.values())} applied, {sum(recorded.values())} nodes")
        print(f"      nodes: {top(recorded)}")

    if args.profile:
        import cProfile
        import pstats

        step = fns[names[0]]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.profile):
            step()
        profiler.disable()
        stats = pstats.Stats(profiler).strip_dirs()
        print(f"\ncProfile of {args.profile} x {names[0]}, by own time:")
        stats.sort_stats("tottime").print_stats(25)
        return

    samples = time_interleaved(fns, args.repeats, args.warmup, clock=args.clock)
    print(f"\nmedian of {args.repeats} meta-iterations after {args.warmup} warm-up (ms):")
    for name in names:
        ms = [s * 1e3 for s in samples[name]]
        print(f"  {name:6s} {median(ms):8.3f}   IQR {spread(ms)}")
    warning = noise_warning(samples)
    if warning:
        print(warning)


if __name__ == "__main__":
    main()
