"""Shared by the benchmark scripts: thread setup, interleaved timing, the BLAS ceiling, and W1
and W2 of benchmarks/README.md written once for tinymeta and once for PyTorch.

``setup_threads`` must run before NumPy (or anything that imports it) is
imported: BLAS libraries read their thread count once, when they load. This
module therefore imports NumPy, tinymeta and PyTorch only inside its functions.

The workloads (used by ``bench_cpu.py``, ``bench_gpu.py`` and ``bench_w1_profile.py``): the
sizes, the data and initial weights (NumPy, float32, fixed seeds), and each framework's
meta-iteration built from them. Every builder returns two functions: ``step()`` runs one
meta-iteration (meta-loss, meta-gradient, Adam outer step) and ``gradient()`` returns the
meta-gradient at the initial weights as a dict of NumPy arrays, which is how the scripts check
that the frameworks compute the same thing before timing them.

W1, sinusoid MAML: MLP 1-40-40-1 (ReLU), 25 tasks, K=10 support and 10 query
points, inner SGD lr 0.01 on MSE, Adam outer step (lr 1e-3).
W2, Omniglot-size MAML: 4 blocks of [conv 3x3, 64 filters, padding 1 -> batch
norm (batch statistics, learnable affine) -> ReLU -> max-pool 2x2] on 1x28x28,
then linear to 5 classes; 5-way 1-shot, 5 queries per class, 8 tasks, 1 inner
step (lr 0.4), cross-entropy, Adam outer step. Random images: the data does
not change the work.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMBA_NUM_THREADS",
)


def base_parser(description: str, repeats: int, warmup: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed repetitions first")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter (default); cpu: time.process_time, the CPU time of this "
        "process (all its threads), steadier on a shared machine; use it with --threads 1",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="BLAS/OpenMP threads for every library (default: $OMP_NUM_THREADS, else 2)",
    )
    return parser


def add_keep_freed_memory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc malloc keeps freed memory (tinymeta.backend.keep_freed_memory): no page faults "
        "on every iteration's large arrays; applies to every implementation in the process",
    )


def keep_freed_memory_if_asked(args) -> None:
    """Apply ``--keep-freed-memory`` (imports NumPy through tinymeta: call after setup_threads)."""
    if args.keep_freed_memory:
        from tinymeta.backend import keep_freed_memory

        print(f"malloc keeps freed memory: {keep_freed_memory()}")


def setup_threads(threads: int | None) -> int:
    """Give every threading library the same count; call before importing NumPy."""
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    return threads


def describe_machine(threads: int, clock: str = "wall") -> str:
    import numpy as np

    cpus = os.cpu_count()
    try:
        load = f"load average {os.getloadavg()[0]:.2f}"
    except OSError:
        load = "load average unknown"
    what = "elapsed time" if clock == "wall" else "CPU time of this process"
    return (
        f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
        f"{cpus} CPUs visible ({load}), {threads} thread(s) for BLAS/OpenMP; timing {what}"
    )


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    inner: int = 1,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds per call of each function, sampled in turn so that drift hits all alike.

    Each of ``repeats`` rounds times every function once (``inner`` calls per
    sample, for functions too fast to time one call at a time); the order in
    which the functions run rotates from round to round. ``clock="cpu"`` counts
    the process's CPU time instead of elapsed time: other programs on the
    machine then slow the measurement less (caches and memory bandwidth are
    still shared).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            for _ in range(inner):
                fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    clock = time.process_time if clock == "cpu" else time.perf_counter
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            start = clock()
            for _ in range(inner):
                fn()
            samples[name].append((clock() - start) / inner)
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """Interquartile range as 'q1-q3' (same unit as the samples)."""
    qs = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return f"{qs[0]:.4g}-{qs[2]:.4g}"


def noise_warning(samples: dict[str, list[float]], limit: float = 0.25) -> str | None:
    """A warning when any timing's interquartile range exceeds ``limit`` times its median.

    A wide spread means the machine was busy (other processes, or BLAS threads
    of several libraries competing for few cores): ratios are then unreliable.
    """
    noisy = []
    for name, xs in samples.items():
        if len(xs) >= 4:
            q1, _, q3 = statistics.quantiles(xs, n=4)
            if (q3 - q1) > limit * median(xs):
                noisy.append(name)
    if not noisy:
        return None
    return (
        f"WARNING: noisy timings for {', '.join(noisy)} (IQR > {limit:.0%} of the median); "
        "rerun on a quieter machine (on a shared one: --threads 1 --clock cpu)"
    )


def matmul_gflops(n: int = 1024, repeats: int = 20, clock: str = "wall") -> float:
    """NumPy float32 GFLOP/s on a square n x n product (the machine's BLAS ceiling).

    The fastest of ``repeats`` runs: a ceiling is what the machine can do when
    nothing gets in the way.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    for _ in range(3):
        np.matmul(a, b, out=out)
    timer = time.process_time if clock == "cpu" else time.perf_counter
    times = []
    for _ in range(repeats):
        start = timer()
        np.matmul(a, b, out=out)
        times.append(timer() - start)
    return 2.0 * n**3 / min(times) / 1e9


# === W1 and W2 ==================================================================================

W1_TASKS, W1_K, W1_LR, W1_HIDDEN = 25, 10, 0.01, 40
W2_TASKS, W2_WAYS, W2_SHOTS, W2_QUERIES, W2_LR, W2_FILTERS = 8, 5, 1, 5, 0.4, 64
W2_SIDE = 28
OUTER_LR = 1e-3


# --- shared data and initial weights (NumPy, float32) ----------------------------------------


def uniform_init(rng, shape, fan_in):
    """PyTorch's default layer init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype("float32")


def w1_weights(np) -> dict:
    rng = np.random.default_rng(0)
    h = W1_HIDDEN
    return {
        "w1": uniform_init(rng, (h, 1), 1),
        "b1": uniform_init(rng, (h,), 1),
        "w2": uniform_init(rng, (h, h), h),
        "b2": uniform_init(rng, (h,), h),
        "w3": uniform_init(rng, (1, h), h),
        "b3": uniform_init(rng, (1,), h),
    }


def w1_data(np) -> list:
    """xs, ys, xq, yq of shape (tasks, K, 1): amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5]."""
    rng = np.random.default_rng(1)
    amp = rng.uniform(0.1, 5.0, (W1_TASKS, 1, 1))
    phase = rng.uniform(0.0, math.pi, (W1_TASKS, 1, 1))
    xs = rng.uniform(-5.0, 5.0, (W1_TASKS, W1_K, 1))
    xq = rng.uniform(-5.0, 5.0, (W1_TASKS, W1_K, 1))
    ys, yq = amp * np.sin(xs + phase), amp * np.sin(xq + phase)
    return [a.astype("float32") for a in (xs, ys, xq, yq)]


def w2_weights(np) -> dict:
    rng = np.random.default_rng(2)
    weights, c = {}, 1
    for i in range(4):
        weights[f"conv{i}.w"] = uniform_init(rng, (W2_FILTERS, c, 3, 3), c * 9)
        weights[f"conv{i}.b"] = uniform_init(rng, (W2_FILTERS,), c * 9)
        weights[f"bn{i}.w"] = np.ones(W2_FILTERS, dtype="float32")
        weights[f"bn{i}.b"] = np.zeros(W2_FILTERS, dtype="float32")
        c = W2_FILTERS
    weights["fc.w"] = uniform_init(rng, (W2_WAYS, W2_FILTERS), W2_FILTERS)
    weights["fc.b"] = uniform_init(rng, (W2_WAYS,), W2_FILTERS)
    return weights


def w2_data(np) -> list:
    """Support (tasks, ways*shots, 1, 28, 28), query (tasks, ways*queries, 1, 28, 28), labels."""
    rng = np.random.default_rng(3)
    side = W2_SIDE
    xs = rng.standard_normal((W2_TASKS, W2_WAYS * W2_SHOTS, 1, side, side)).astype("float32")
    xq = rng.standard_normal((W2_TASKS, W2_WAYS * W2_QUERIES, 1, side, side)).astype("float32")
    ys = np.tile(np.repeat(np.arange(W2_WAYS), W2_SHOTS), (W2_TASKS, 1)).astype("int64")
    yq = np.tile(np.repeat(np.arange(W2_WAYS), W2_QUERIES), (W2_TASKS, 1)).astype("int64")
    return [xs, ys, xq, yq]


def as_float64(np, weights: dict, data: list) -> tuple:
    """The same weights and data in float64 (labels stay integers), for a tighter check."""
    wide = {k: v.astype(np.float64) for k, v in weights.items()}
    return wide, [a.astype(np.float64) if a.dtype.kind == "f" else a for a in data]


def w2_matmul_flops(first_order: bool) -> int:
    """Floating-point operations of the products in one W2 meta-iteration (multiply-add = 2).

    Per image and layer, a forward convolution is one product of M
    multiply-adds (M = output pixels x out channels x in channels x 9; the
    final linear layer likewise). Its backward is two more of the same size:
    the weight gradient and the input gradient (none for layer 1, whose input
    is the image). First order: support and query images each pay forward +
    backward. Second order: the support images also pay for the backward of
    their backward: each of the backward's two products is differentiated
    w.r.t. both of its operands (4 products; 2 in layer 1, where the input
    gradient does not exist and the image needs none), and the forward's
    backward runs once more for the inputs' path (2 products; 1 in layer 1).
    Batch norm, ReLU, pooling and the loss are elementwise and left out.
    """
    macs, side, channels = [], W2_SIDE, 1
    for _ in range(4):
        macs.append(side * side * W2_FILTERS * channels * 9)
        side, channels = side // 2, W2_FILTERS
    macs.append(side * side * channels * W2_WAYS)  # the linear layer (side is 1 here)
    support = W2_TASKS * W2_WAYS * W2_SHOTS
    query = W2_TASKS * W2_WAYS * W2_QUERIES
    total = 0
    for layer, m in enumerate(macs):
        first = layer == 0
        forward_backward = 3 - first
        total += m * forward_backward * (support + query)
        if not first_order:
            total += m * ((2 if first else 4) + (1 if first else 2)) * support
    return 2 * total


def w2_floor(first_order: bool, clock: str = "wall") -> tuple:
    """(GFLOP of W2's products, NumPy float32 matmul GFLOP/s, floor in seconds) on this machine."""
    flops = w2_matmul_flops(first_order)
    gflops = matmul_gflops(clock=clock)
    return flops / 1e9, gflops, flops / (gflops * 1e9)


def agreement(ref: dict, other: dict) -> float:
    """max |other - ref| / max |ref| over all parameters' gradients."""
    import numpy as np

    scale = max(float(np.abs(g).max()) for g in ref.values()) or 1.0
    return max(float(np.abs(np.asarray(other[k]) - ref[k]).max()) for k in ref) / scale


# --- tinymeta ---------------------------------------------------------------------------------


class Tinymeta:
    """tinymeta's W1 (task-vectorized) and W2 (looped over tasks, or task-vectorized)."""

    def __init__(self, device: str = "cpu"):
        import tinymeta as tm
        import tinymeta.nn.functional as F
        from tinymeta import meta
        from tinymeta.optim import Adam

        self.tm, self.F, self.meta, self.Adam, self.device = tm, F, meta, Adam, device

    def _setup(self, weights: dict, data: list):
        tm = self.tm
        params = {
            k: tm.tensor(v, device=self.device, requires_grad=True) for k, v in weights.items()
        }
        return (
            params,
            self.Adam(list(params.values()), lr=OUTER_LR),
            [tm.tensor(a, device=self.device) for a in data],
        )

    def mlp(self, p, x):
        F = self.F
        h = F.relu(F.linear(x, p["w1"], p["b1"]))
        h = F.relu(F.linear(h, p["w2"], p["b2"]))
        return F.linear(h, p["w3"], p["b3"])

    def convnet(self, p, x):
        F = self.F
        for i in range(4):
            x = F.conv2d(x, p[f"conv{i}.w"], p[f"conv{i}.b"], padding=1)
            x = F.batch_norm(x, None, None, p[f"bn{i}.w"], p[f"bn{i}.b"], training=True)
            x = F.max_pool2d(F.relu(x), 2)
        # (..., 64, 1, 1) -> (..., 64): the leading axes are (images,) or (tasks, images)
        return F.linear(x.reshape(x.shape[:-3] + (-1,)), p["fc.w"], p["fc.b"])

    def cross_entropy(self, logits, labels):
        """Mean over every image, with a task axis (vectorized) or without (looped)."""
        return self.F.cross_entropy(logits.reshape(-1, W2_WAYS), labels.reshape(-1))

    def w1(self, weights, data, steps: int, first_order: bool = False):
        params, opt, (xs, ys, xq, yq) = self._setup(weights, data)

        def meta_loss():
            return self.meta.maml_loss(
                self.mlp, params, (xs, ys), (xq, yq), self.F.mse_loss, W1_LR, steps,
                first_order=first_order,
            )  # fmt: skip

        return self._wrap(params, opt, meta_loss)

    def w2(self, weights, data, first_order: bool, vectorized: bool = False):
        params, opt, (xs, ys, xq, yq) = self._setup(weights, data)

        def meta_loss():
            return self.meta.maml_loss(
                self.convnet, params, (xs, ys), (xq, yq), self.cross_entropy, W2_LR, 1,
                first_order=first_order, vectorized=vectorized,
            )  # fmt: skip

        return self._wrap(params, opt, meta_loss)

    def _wrap(self, params, opt, meta_loss):
        def step():
            loss = meta_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()

        def gradient() -> dict:
            gs = self.tm.grad(meta_loss(), list(params.values()))
            return {k: g.numpy() for k, g in zip(params, gs)}

        return step, gradient


# --- PyTorch ----------------------------------------------------------------------------------


class Torch:
    """The same meta-iterations in PyTorch: looped ``autograd.grad``, and ``torch.func``.

    The looped variant is what learn2learn and higher do: one task after the
    other, ``torch.autograd.grad(create_graph=True)`` for the inner step. The
    ``torch.func`` variant maps one task's meta-loss (inner steps by
    ``torch.func.grad``) over the task axis with ``vmap``. The models are
    functions of a parameter dict, which is what ``torch.func.functional_call``
    makes of a module.
    """

    def __init__(self, torch, device: str = "cpu"):
        import torch.nn.functional as F

        self.torch, self.F, self.device = torch, F, device

    def _setup(self, weights: dict, data: list):
        t = self.torch
        params = {
            k: t.tensor(v, device=self.device).requires_grad_(True) for k, v in weights.items()
        }
        return (
            params,
            t.optim.Adam(list(params.values()), lr=OUTER_LR),
            [t.tensor(a, device=self.device) for a in data],
        )

    def mlp(self, p, x):
        F = self.F
        h = F.relu(F.linear(x, p["w1"], p["b1"]))
        h = F.relu(F.linear(h, p["w2"], p["b2"]))
        return F.linear(h, p["w3"], p["b3"])

    def convnet(self, p, x, batch_norm=None):
        F = self.F
        if batch_norm is None:

            def batch_norm(x, w, b):
                return F.batch_norm(x, None, None, w, b, training=True)

        for i in range(4):
            x = F.conv2d(x, p[f"conv{i}.w"], p[f"conv{i}.b"], padding=1)
            x = batch_norm(x, p[f"bn{i}.w"], p[f"bn{i}.b"])
            x = F.max_pool2d(F.relu(x), 2)
        return F.linear(x.flatten(1), p["fc.w"], p["fc.b"])

    def convnet_for_vmap(self, p, x):
        """The conv net with batch norm spelled out in mean/var ops.

        Under ``vmap`` of ``grad``, ``F.batch_norm``'s second-order meta-gradient
        is wrong (relative error ~6e-3 in float64 with torch 2.13; the batching
        rule of its backward, pytorch/functorch#534); the composed form agrees
        with the looped ``F.batch_norm`` to 1e-15.
        """

        def batch_norm(x, w, b, eps=1e-5):
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased, as in training
            return (x - mean) / self.torch.sqrt(var + eps) * w[:, None, None] + b[:, None, None]

        return self.convnet(p, x, batch_norm)

    def _looped_meta_loss(self, forward, loss_fn, params, data, lr, steps, first_order):
        xs, ys, xq, yq = data
        total = 0.0
        for t in range(xs.shape[0]):
            p = params
            for _ in range(steps):
                loss = loss_fn(forward(p, xs[t]), ys[t])
                # create_graph=False hands back constants: p - lr * g is then first-order MAML
                gs = self.torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
                p = {k: v - lr * g for (k, v), g in zip(p.items(), gs)}
            total = total + loss_fn(forward(p, xq[t]), yq[t])
        return total / xs.shape[0]

    def _vmapped_meta_loss(self, forward, loss_fn, params, data, lr, steps, first_order):
        from torch.func import grad, vmap

        def task_loss(p, xs, ys, xq, yq):
            for _ in range(steps):
                g = grad(lambda p_: loss_fn(forward(p_, xs), ys))(p)
                if first_order:
                    g = {k: v.detach() for k, v in g.items()}
                p = {k: p[k] - lr * g[k] for k in p}
            return loss_fn(forward(p, xq), yq)

        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, *data).mean()

    def w1_loop(self, weights, data, steps: int, first_order: bool = False):
        return self._build(
            self._looped_meta_loss, self.mlp, self.F.mse_loss, weights, data, W1_LR, steps,
            first_order,
        )  # fmt: skip

    def w1_vmap(self, weights, data, steps: int, first_order: bool = False):
        return self._build(
            self._vmapped_meta_loss, self.mlp, self.F.mse_loss, weights, data, W1_LR, steps,
            first_order,
        )  # fmt: skip

    def w2_loop(self, weights, data, first_order: bool):
        return self._build(
            self._looped_meta_loss, self.convnet, self.F.cross_entropy, weights, data, W2_LR, 1,
            first_order,
        )  # fmt: skip

    def w2_vmap(self, weights, data, first_order: bool):
        return self._build(
            self._vmapped_meta_loss, self.convnet_for_vmap, self.F.cross_entropy, weights, data,
            W2_LR, 1,
            first_order,
        )  # fmt: skip

    def w1_vmap_graphed(self, weights, data, steps: int):
        return self._graphed(
            self._vmapped_meta_loss, self.mlp, self.F.mse_loss, weights, data, W1_LR, steps, False
        )

    def w2_loop_graphed(self, weights, data, first_order: bool):
        return self._graphed(
            self._looped_meta_loss, self.convnet, self.F.cross_entropy, weights, data, W2_LR, 1,
            first_order,
        )  # fmt: skip

    def _graphed(self, meta_loss_of, forward, loss_fn, weights, data, lr, steps, first_order):
        """PyTorch with the technique of ``tm.capture`` on cuda: the whole meta-iteration
        (meta-loss, meta-gradient, Adam with ``capturable=True``) captured as one CUDA graph
        (``torch.cuda.graph``) after three eager iterations on a side stream, as PyTorch's
        CUDA-graph notes show for a whole network. Returns ``(step, drift)``: ``step``
        replays the graph; ``drift()`` replays it once and gives the relative difference
        (norm-wise, largest over the parameters) between the meta-gradient the replay left
        in ``.grad`` and the one eager PyTorch computes at the same weights."""
        t = self.torch
        params = {k: t.tensor(v, device="cuda").requires_grad_() for k, v in weights.items()}
        opt = t.optim.Adam(list(params.values()), lr=OUTER_LR, capturable=True)
        batch = [t.tensor(a, device="cuda") for a in data]

        def meta_loss(p):
            return meta_loss_of(forward, loss_fn, p, batch, lr, steps, first_order)

        side = t.cuda.Stream()
        side.wait_stream(t.cuda.current_stream())
        with t.cuda.stream(side):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                meta_loss(params).backward()
                opt.step()
        t.cuda.current_stream().wait_stream(side)
        graph = t.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # the captured backward makes .grad in the graph's pool
        with t.cuda.graph(graph):
            meta_loss(params).backward()
            opt.step()

        def drift() -> float:
            before = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
            graph.replay()
            eager = t.autograd.grad(meta_loss(before), list(before.values()))
            t.cuda.synchronize()
            return max(
                float(((params[k].grad - g).norm() / g.norm()).item())
                for k, g in zip(before, eager)
            )

        return graph.replay, drift

    def _build(self, meta_loss_of, forward, loss_fn, weights, data, lr, steps, first_order):
        params, opt, data = self._setup(weights, data)

        def meta_loss():
            return meta_loss_of(forward, loss_fn, params, data, lr, steps, first_order)

        def step():
            opt.zero_grad()
            meta_loss().backward()
            opt.step()

        def gradient() -> dict:
            gs = self.torch.autograd.grad(meta_loss(), list(params.values()))
            return {k: g.detach().cpu().numpy() for k, g in zip(params, gs)}

        return step, gradient
