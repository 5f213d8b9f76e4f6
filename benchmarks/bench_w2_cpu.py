"""W2 of benchmarks/README.md on the CPU: tinymeta's Omniglot-size MAML meta-iteration, with the
meta-batch looped over tasks and task-vectorized, second and first order.

The network is the MAML Omniglot CNN built from ``tinymeta.nn`` modules (``build_w2``):
4 x [conv 3x3, 64 filters, padding 1 -> BatchNorm2d (batch statistics, learnable affine)
-> ReLU -> max-pool 2x2] on 1x28x28 images, then Flatten and a linear layer to 5 classes.
A meta-iteration: 8 tasks of 5-way 1-shot with 5 queries per class, 1 inner SGD step
(lr 0.4) on the support cross-entropy, the mean query cross-entropy as meta-loss, its
meta-gradient (through the inner step, or first order) and an Adam outer step (lr 1e-3).

- looped: ``maml_loss(..., vectorized=False)``, one task after the other;
- vectorized: ``maml_loss(..., vectorized=True)``, the parameters with a task axis
  (``meta.per_task``), every layer batched over the 8 tasks (batched convolutions,
  per-task batch norm), one graph for the whole meta-batch.

Before timing, it checks that both give the same meta-gradient. Prints the median ms per
meta-iteration, the interquartile range, and the vectorized speed-up.

    python benchmarks/bench_w2_cpu.py --threads 1 --clock cpu --repeats 10 --warmup 2
    # examples/maml_omniglot.py's default setup: 20-way 1-shot, 1 query, 32 filters
    python benchmarks/bench_w2_cpu.py --threads 1 --clock cpu --ways 20 --queries 1 --filters 32
    # malloc keeping freed memory (see keep_freed_memory), as the Omniglot example does
    python benchmarks/bench_w2_cpu.py --threads 1 --clock cpu --keep-freed-memory
    # where a task-vectorized meta-iteration's CPU time goes: by op (and by shapes), kernels
    python benchmarks/bench_w2_cpu.py --threads 1 --keep-freed-memory --ops --repeats 3
    python benchmarks/bench_w2_cpu.py --threads 1 --keep-freed-memory --ops --by-shape

``build_w2``, ``w2_batch`` and ``w2_meta_step`` are importable (a side-by-side script can
build the same network and data); none of them imports anything at module level.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    base_parser,
    describe_machine,
    median,
    noise_warning,
    setup_threads,
    spread,
    time_interleaved,
)

TASKS, WAYS, SHOTS, QUERIES, FILTERS, SIDE = 8, 5, 1, 5, 64, 28
INNER_LR, OUTER_LR = 0.4, 1e-3


def build_w2(filters: int = FILTERS, ways: int = WAYS, seed: int = 0, dtype=None, device="cpu"):
    """W2's network as an ``nn.Sequential`` (PyTorch's default init, seeded by ``seed``).

    Parameter names: ``{4*i}.weight``/``.bias`` for conv i, ``{4*i+1}.weight``/``.bias``
    for batch norm i (i = 0..3), ``17.weight``/``.bias`` for the linear layer.
    ``Flatten(-3)`` leaves the batch axes alone, so the net takes (N, 1, 28, 28) and,
    under ``functional_call`` with per-task parameters, (T, N, 1, 28, 28).
    """
    import numpy as np

    from tinymeta import nn

    rng = np.random.default_rng(seed)
    layers, channels = [], 1
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, filters, 3, padding=1, dtype=dtype, rng=rng),
            nn.BatchNorm2d(filters, track_running_stats=False, dtype=dtype),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = filters
    model = nn.Sequential(*layers, nn.Flatten(-3), nn.Linear(filters, ways, dtype=dtype, rng=rng))
    return model.to(device)


def w2_batch(
    tasks: int = TASKS,
    ways: int = WAYS,
    shots: int = SHOTS,
    queries: int = QUERIES,
    seed: int = 3,
    dtype="float32",
) -> tuple:
    """(xs, ys, xq, yq): support (T, ways*shots, 1, 28, 28), query (T, ways*queries, 1, 28, 28),
    integer labels; random images (the data does not change the work)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((tasks, ways * shots, 1, SIDE, SIDE)).astype(dtype)
    xq = rng.standard_normal((tasks, ways * queries, 1, SIDE, SIDE)).astype(dtype)
    ys = np.tile(np.repeat(np.arange(ways), shots), (tasks, 1))
    yq = np.tile(np.repeat(np.arange(ways), queries), (tasks, 1))
    return xs, ys, xq, yq


def w2_meta_loss(model, params: dict, batch: tuple, first_order: bool, vectorized: bool):
    """The mean over tasks of the query cross-entropy after one inner SGD step."""
    import tinymeta as tm
    import tinymeta.nn.functional as F
    from tinymeta import meta, nn

    xs, ys, xq, yq = batch
    device = next(iter(params.values())).device
    support = (tm.tensor(xs, device=device), ys)
    query = (tm.tensor(xq, device=device), yq)

    def forward(p, x):
        return nn.functional_call(model, p, x)

    def cross_entropy(logits, labels):  # a mean over every example, task axis or not
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    return meta.maml_loss(
        forward, params, support, query, cross_entropy, INNER_LR, 1,
        first_order=first_order, vectorized=vectorized,
    )  # fmt: skip


def w2_meta_step(model, batch: tuple, first_order: bool, vectorized: bool):
    """A function running one meta-iteration (meta-loss, meta-gradient, Adam step) on
    ``model``'s parameters, and one returning the meta-gradient as NumPy arrays."""
    import tinymeta as tm
    from tinymeta.optim import Adam

    params = dict(model.named_parameters())
    outer = Adam(list(params.values()), lr=OUTER_LR)

    def step():
        loss = w2_meta_loss(model, params, batch, first_order, vectorized)
        outer.zero_grad()
        loss.backward()
        outer.step()

    def gradient() -> dict:
        loss = w2_meta_loss(model, params, batch, first_order, vectorized)
        return {k: g.numpy() for k, g in zip(params, tm.grad(loss, list(params.values())))}

    return step, gradient


class OpTimer:
    """CPU time (``time.thread_time``) of every op's forward and of the ``tinymeta.kernels``
    calls, summed by name (and input shapes with ``by_shape``), while installed.

    An op's time includes the kernels it calls; kernels are also listed on their own
    (``kernel:`` rows), so the two kinds of rows overlap and do not add up to the total.
    """

    KERNELS = (
        "im2col", "col2im", "winograd_input", "winograd_input_adjoint", "winograd_output",
        "winograd_output_adjoint", "bn_forward", "bn_backward", "bn_double_backward",
        "maxpool2d_argmax", "maxpool2d_scatter", "maxpool2d_gather", "relu_backward",
    )  # fmt: skip

    def __init__(self, by_shape: bool = False):
        import collections

        self.by_shape = by_shape
        self.seconds = collections.Counter()
        self.calls = collections.Counter()
        self.saved = []

    def _timed(self, function, name: str):
        import time

        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                key = name
                if self.by_shape:
                    key += " " + str(tuple(getattr(a, "shape", None) for a in args[:3]))
                self.seconds[key] += time.thread_time() - start
                self.calls[key] += 1

        return timed

    def __enter__(self):
        import tinymeta.meta  # noqa: F401  (every op class defined before they are wrapped)
        import tinymeta.nn.functional  # noqa: F401
        from tinymeta import kernels
        from tinymeta.function import Function

        pending, ops = [Function], []
        while pending:
            cls = pending.pop()
            pending.extend(cls.__subclasses__())
            if "forward" in cls.__dict__:
                ops.append(cls)
        for cls in ops:
            self.saved.append((cls, "forward", cls.__dict__["forward"]))
            cls.forward = self._timed(cls.__dict__["forward"], cls.__name__)
        for name in self.KERNELS:
            self.saved.append((kernels, name, getattr(kernels, name)))
            setattr(kernels, name, self._timed(getattr(kernels, name), "kernel:" + name))
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)
        return False

    def report(self, iterations: int, total_s: float, top: int = 25) -> None:
        print(f"\nCPU time per meta-iteration: {total_s / iterations * 1e3:.1f} ms")
        print(f"{'ms':>9} {'calls':>6}  op or kernel")
        for key, seconds in self.seconds.most_common(top):
            calls = self.calls[key] // iterations
            print(f"{seconds / iterations * 1e3:9.2f} {calls:6d}  {key}")


def profile_ops(args) -> None:
    """Per-op CPU time of the task-vectorized meta-iteration (``--ops``)."""
    import time

    for order in ("second", "first"):
        model = build_w2(args.filters, args.ways, device=args.device)
        batch = w2_batch(args.tasks, args.ways, args.shots, args.queries)
        step, _ = w2_meta_step(model, batch, order == "first", vectorized=True)
        for _ in range(max(args.warmup, 1)):
            step()
        with OpTimer(args.by_shape) as timer:
            start = time.thread_time()
            for _ in range(args.repeats):
                step()
            total = time.thread_time() - start
        print(f"\n{order} order, task-vectorized, {args.repeats} meta-iterations")
        timer.report(args.repeats, total)


def main(argv=None) -> dict:
    parser = base_parser(__doc__.splitlines()[0], repeats=10, warmup=2)
    parser.add_argument("--filters", type=int, default=FILTERS, help="channels of every conv")
    parser.add_argument("--tasks", type=int, default=TASKS, help="meta-batch size")
    parser.add_argument("--ways", type=int, default=WAYS)
    parser.add_argument("--shots", type=int, default=SHOTS)
    parser.add_argument("--queries", type=int, default=QUERIES, help="query images per class")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc: no mmap, no heap trimming (as examples/maml_omniglot.py does)",
    )
    parser.add_argument(
        "--ops", action="store_true", help="per-op CPU time of a meta-iteration instead"
    )
    parser.add_argument("--by-shape", action="store_true", help="with --ops: by input shapes")
    args = parser.parse_args(argv)
    threads = setup_threads(args.threads)
    from tinymeta.backend import keep_freed_memory

    if args.keep_freed_memory and not keep_freed_memory():
        print("--keep-freed-memory: not glibc, malloc left as it is")

    import numpy as np

    print(describe_machine(threads, args.clock))
    if args.ops:
        profile_ops(args)
        return {}
    print(
        f"W2: {args.tasks} tasks, {args.ways}-way {args.shots}-shot, {args.queries} queries per "
        f"class, {args.filters} filters, 1 inner step (lr {INNER_LR}), Adam outer step"
    )
    batch = w2_batch(args.tasks, args.ways, args.shots, args.queries)
    fns, grads = {}, {}
    for order in ("second", "first"):
        for mode in ("looped", "vectorized"):
            model = build_w2(args.filters, args.ways, device=args.device)  # same weights
            step, gradient = w2_meta_step(model, batch, order == "first", mode == "vectorized")
            grads[order, mode] = gradient()
            fns[f"{order} order, {mode}"] = step
    for order in ("second", "first"):
        ref, got = grads[order, "looped"], grads[order, "vectorized"]
        scale = max(float(np.abs(g).max()) for g in ref.values())
        worst = max(float(np.abs(got[k] - ref[k]).max()) for k in ref) / scale
        print(
            f"{order} order: vectorized vs looped meta-gradient, max |diff| / max |g| = {worst:.1e}"
        )
        if worst > 1e-3:
            raise AssertionError(f"W2 {order} order: vectorized and looped meta-gradients differ")

    samples = time_interleaved(fns, args.repeats, args.warmup, clock=args.clock)
    ms = {name: median(xs) * 1e3 for name, xs in samples.items()}
    print(f"\n{'meta-iteration':<28} {'median ms':>10} {'IQR ms':>16}")
    for name, xs in samples.items():
        print(f"{name:<28} {ms[name]:>10.1f} {spread([x * 1e3 for x in xs]):>16}")
    for order in ("second", "first"):
        ratio = ms[f"{order} order, looped"] / ms[f"{order} order, vectorized"]
        print(f"{order} order: vectorized is {ratio:.2f}x the speed of looped")
    warning = noise_warning(samples)
    if warning:
        print(warning)
    return ms


if __name__ == "__main__":
    main()
