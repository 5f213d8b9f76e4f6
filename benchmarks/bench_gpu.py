"""W1 and W2 of BENCHMARKS.md on a GPU: tinymeta (device="cuda", CuPy) next to PyTorch CUDA.

W1, sinusoid MAML: MLP 1-40-40-1 (ReLU), 25 tasks, K=10 support and 10 query
points, inner SGD lr 0.01 on MSE, second-order meta-gradient, Adam outer step
(lr 1e-3); 1 and 5 inner steps. tinymeta runs all tasks as one batched
computation (``meta.maml_loss(vectorized=True)``); PyTorch loops over tasks
with ``torch.autograd.grad(create_graph=True)`` (as learn2learn and higher do)
and also vectorizes them with ``torch.func`` (``grad`` inside ``vmap``).

W2, Omniglot-size MAML: 4 blocks of [conv 3x3, 64 filters, padding 1 -> batch
norm (batch statistics, learnable affine) -> ReLU -> max-pool 2x2] on 1x28x28,
then linear to 5 classes; 5-way 1-shot, 5 query images per class, meta-batch
8, 1 inner step (lr 0.4), cross-entropy, Adam outer step; second and first
order. Both frameworks loop over tasks (tinymeta's conv2d takes no per-task
weights), on random images (the data does not change the work).

Both frameworks run in this process, on the same device, from the same initial
weights and data; before timing, one meta-gradient of each implementation is
compared with tinymeta's (float32: agreement to ~1e-4 is expected). PyTorch's
TF32 is switched off (CuPy's matmul does not use it). Each timed call ends with
a device synchronisation (CuPy's and PyTorch's), and the implementations are
timed in turn, round after round; the table gives medians and tinymeta/PyTorch
ratios (above 1: tinymeta is slower).

    python benchmarks/bench_gpu.py                    # both workloads, device cuda
    python benchmarks/bench_gpu.py --only w1 --w1-repeats 50
    python benchmarks/bench_gpu.py --device cpu --quick  # the same code on the cpu (a dry run)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

W1_TASKS, W1_K, W1_LR, W1_HIDDEN = 25, 10, 0.01, 40
W2_TASKS, W2_WAYS, W2_SHOTS, W2_QUERIES, W2_LR, W2_FILTERS = 8, 5, 1, 5, 0.4, 64
OUTER_LR = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--only", choices=("w1", "w2", "all"), default="all")
    parser.add_argument("--w1-repeats", type=int, default=30, help="timed rounds of W1")
    parser.add_argument("--w1-warmup", type=int, default=3)
    parser.add_argument("--w2-repeats", type=int, default=7, help="timed rounds of W2")
    parser.add_argument("--w2-warmup", type=int, default=2)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=200.0,
        help="wall-clock budget for the timed rounds: fewer rounds (3 at least) when a "
        "workload would overrun its share",
    )
    parser.add_argument("--no-torch", action="store_true", help="time tinymeta alone")
    parser.add_argument("--quick", action="store_true", help="2 rounds each (a smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.w1_repeats = args.w2_repeats = 2
        args.w1_warmup = args.w2_warmup = 1
    return args


# --- shared data and initial weights (NumPy, float32) ----------------------------------------


def uniform_init(rng, shape, fan_in):
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
    xs = rng.standard_normal((W2_TASKS, W2_WAYS * W2_SHOTS, 1, 28, 28)).astype("float32")
    xq = rng.standard_normal((W2_TASKS, W2_WAYS * W2_QUERIES, 1, 28, 28)).astype("float32")
    ys = np.tile(np.repeat(np.arange(W2_WAYS), W2_SHOTS), (W2_TASKS, 1)).astype("int64")
    yq = np.tile(np.repeat(np.arange(W2_WAYS), W2_QUERIES), (W2_TASKS, 1)).astype("int64")
    return [xs, ys, xq, yq]


# --- tinymeta ---------------------------------------------------------------------------------


class Tinymeta:
    """tinymeta's W1 (task-vectorized) and W2 (looped) meta-iterations."""

    def __init__(self, device: str):
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
        return F.linear(self.tm.flatten(x, 1), p["fc.w"], p["fc.b"])

    def w1(self, weights, data, steps: int, first_order: bool = False):
        params, opt, (xs, ys, xq, yq) = self._setup(weights, data)

        def meta_loss():
            return self.meta.maml_loss(
                self.mlp, params, (xs, ys), (xq, yq), self.F.mse_loss, W1_LR, steps,
                first_order=first_order,
            )  # fmt: skip

        return self._wrap(params, opt, meta_loss)

    def w2(self, weights, data, first_order: bool):
        params, opt, (xs, ys, xq, yq) = self._setup(weights, data)

        def meta_loss():
            return self.meta.maml_loss(
                self.convnet, params, (xs, ys), (xq, yq), self.F.cross_entropy, W2_LR, 1,
                first_order=first_order, vectorized=False,
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
    """The same meta-iterations in PyTorch: looped autograd.grad, and torch.func for W1."""

    def __init__(self, torch, device: str):
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

    def convnet(self, p, x):
        F = self.F
        for i in range(4):
            x = F.conv2d(x, p[f"conv{i}.w"], p[f"conv{i}.b"], padding=1)
            x = F.batch_norm(x, None, None, p[f"bn{i}.w"], p[f"bn{i}.b"], training=True)
            x = F.max_pool2d(F.relu(x), 2)
        return F.linear(x.flatten(1), p["fc.w"], p["fc.b"])

    def _looped_meta_loss(self, forward, loss_fn, params, data, lr, steps, first_order):
        xs, ys, xq, yq = data
        total = 0.0
        for t in range(xs.shape[0]):
            p = params
            for _ in range(steps):
                loss = loss_fn(forward(p, xs[t]), ys[t])
                gs = self.torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
                p = {k: v - lr * g for (k, v), g in zip(p.items(), gs)}
            total = total + loss_fn(forward(p, xq[t]), yq[t])
        return total / xs.shape[0]

    def w1_loop(self, weights, data, steps: int, first_order: bool = False):
        params, opt, data = self._setup(weights, data)
        return self._wrap(
            params,
            opt,
            lambda: self._looped_meta_loss(
                self.mlp, self.F.mse_loss, params, data, W1_LR, steps, first_order
            ),
        )

    def w1_vmap(self, weights, data, steps: int):
        from torch.func import grad, vmap

        params, opt, data = self._setup(weights, data)
        mse = self.F.mse_loss

        def task_loss(p, xs, ys, xq, yq):
            for _ in range(steps):
                g = grad(lambda p_: mse(self.mlp(p_, xs), ys))(p)
                p = {k: p[k] - W1_LR * g[k] for k in p}
            return mse(self.mlp(p, xq), yq)

        def meta_loss():
            return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, *data).mean()

        return self._wrap(params, opt, meta_loss)

    def w2_loop(self, weights, data, first_order: bool):
        params, opt, data = self._setup(weights, data)
        return self._wrap(
            params,
            opt,
            lambda: self._looped_meta_loss(
                self.convnet, self.F.cross_entropy, params, data, W2_LR, 1, first_order
            ),
        )

    def _wrap(self, params, opt, meta_loss):
        def step():
            opt.zero_grad()
            meta_loss().backward()
            opt.step()

        def gradient() -> dict:
            gs = self.torch.autograd.grad(meta_loss(), list(params.values()))
            return {k: g.detach().cpu().numpy() for k, g in zip(params, gs)}

        return step, gradient


# --- timing -----------------------------------------------------------------------------------


def make_sync(cupy, torch, device: str):
    """Wait for every queued kernel of both frameworks (a no-op on the cpu)."""
    if device != "cuda":
        return lambda: None
    fns = []
    if cupy is not None:
        fns.append(lambda: cupy.cuda.Device().synchronize())
    if torch is not None and torch.cuda.is_available():
        fns.append(torch.cuda.synchronize)

    def sync():
        for f in fns:
            f()

    return sync


def time_rounds(fns: dict, repeats: int, warmup: int, sync, budget_s: float) -> dict:
    """Seconds per call of each function, in turn each round (the order rotates).

    Each sample ends with ``sync()``. After the warm-up (which also compiles
    CuPy's kernels), the number of rounds is cut to fit ``budget_s`` (3 at least).
    """
    names = list(fns)
    per_round = 0.0
    for _ in range(warmup):  # the last warm-up round (kernels compiled by then) sets the pace
        start = time.perf_counter()
        for name in names:
            fns[name]()
            sync()
        per_round = time.perf_counter() - start
    if per_round * repeats > budget_s:
        repeats = max(3, int(budget_s / per_round))
    samples = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return samples


def agreement(ref: dict, other: dict) -> float:
    """max |other - ref| / max |ref| over all parameters' meta-gradients."""
    import numpy as np

    scale = max(float(np.abs(g).max()) for g in ref.values()) or 1.0
    return max(float(np.abs(other[k] - ref[k]).max()) for k in ref) / scale


# --- the workloads ------------------------------------------------------------------------------


def run_w1(args, tmeta, torch_impl, sync, budget_s, rows, checks):
    import numpy as np

    weights, data = w1_weights(np), w1_data(np)
    for steps in (1, 5):
        fns, grads = {}, {}
        fns["tinymeta"], grads["tinymeta"] = tmeta.w1(weights, data, steps)
        if torch_impl is not None:
            fns["torch loop"], grads["torch loop"] = torch_impl.w1_loop(weights, data, steps)
            fns["torch vmap"], grads["torch vmap"] = torch_impl.w1_vmap(weights, data, steps)
        label = f"W1 2nd-order, {steps} inner step{'s' * (steps > 1)}, {W1_TASKS} tasks"
        row, found = check_and_time(
            label, fns, grads, args.w1_repeats, args.w1_warmup, sync, budget_s / 2
        )
        rows.append(row)
        checks.extend(found)


def run_w2(args, tmeta, torch_impl, sync, budget_s, rows, checks):
    import numpy as np

    weights, data = w2_weights(np), w2_data(np)
    for first_order in (False, True):
        fns, grads = {}, {}
        fns["tinymeta"], grads["tinymeta"] = tmeta.w2(weights, data, first_order)
        if torch_impl is not None:
            fns["torch loop"], grads["torch loop"] = torch_impl.w2_loop(weights, data, first_order)
        label = (
            f"W2 {'1st' if first_order else '2nd'}-order, {W2_WAYS}-way {W2_SHOTS}-shot, "
            f"{W2_TASKS} tasks"
        )
        row, found = check_and_time(
            label, fns, grads, args.w2_repeats, args.w2_warmup, sync, budget_s / 2
        )
        rows.append(row)
        checks.extend(found)


def check_and_time(label, fns, grads, repeats, warmup, sync, budget_s) -> tuple:
    """Compare every implementation's meta-gradient with tinymeta's, then time them all.

    Returns the table row and the list of gradient checks.
    """
    print(f"\n{label}", flush=True)
    reference = grads["tinymeta"]()
    checks = []
    for name, gradient in grads.items():
        if name == "tinymeta":
            continue
        diff = agreement(reference, gradient())
        ok = diff < 1e-3
        checks.append({"workload": label, "against": name, "max_rel_diff": diff, "ok": ok})
        print(f"  meta-gradient vs {name}: max rel diff {diff:.2e} {'ok' if ok else 'MISMATCH'}")
    samples = time_rounds(fns, repeats, warmup, sync, budget_s)
    row = {"workload": label, "rounds": len(next(iter(samples.values())))}
    for name, xs in samples.items():
        q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
        row[name] = {"median_ms": 1e3 * statistics.median(xs), "iqr_ms": 1e3 * (q[2] - q[0])}
        print(
            f"  {name:<11} median {row[name]['median_ms']:9.2f} ms  "
            f"(IQR {row[name]['iqr_ms']:.2f} ms, {len(xs)} rounds)",
            flush=True,
        )
    return row, checks


def print_table(rows, device: str) -> None:
    print(f"\nResults (median ms per meta-iteration, device {device}; ratio = tinymeta / peer)")
    header = (
        f"{'workload':<44} {'tinymeta':>9} {'torch loop':>11} {'torch vmap':>11} "
        f"{'tm/loop':>8} {'tm/vmap':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        tm_ms = row["tinymeta"]["median_ms"]
        cells = [f"{row['workload']:<44}", f"{tm_ms:>9.2f}"]
        for peer in ("torch loop", "torch vmap"):
            cells.append(f"{row[peer]['median_ms']:>11.2f}" if peer in row else f"{'-':>11}")
        for peer in ("torch loop", "torch vmap"):
            ratio = tm_ms / row[peer]["median_ms"] if peer in row else None
            cells.append(f"{ratio:>8.2f}" if ratio is not None else f"{'-':>8}")
        print(" ".join(cells))


def describe(np, cupy, torch, device: str) -> str:
    parts = [f"python {platform.python_version()}", f"numpy {np.__version__}"]
    if cupy is not None:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        parts += [
            f"cupy {cupy.__version__}",
            f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}",
            f"GPU {name}",
        ]
    if torch is not None:
        parts.append(f"torch {torch.__version__} (cuda {torch.version.cuda})")
    return f"device {device}: " + ", ".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np

    import tinymeta as tm

    cupy = None
    if args.device == "cuda":
        if not tm.cuda.is_available():
            print("bench_gpu: device cuda requested but CuPy or a CUDA GPU is not available")
            return 2
        import cupy
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("bench_gpu: PyTorch is not installed: timing tinymeta alone")
    if torch is not None:
        if args.device == "cuda" and not torch.cuda.is_available():
            print("bench_gpu: this PyTorch build sees no CUDA device: timing tinymeta alone")
            torch = None
        else:
            torch.backends.cuda.matmul.allow_tf32 = False  # as CuPy: full float32 products
            torch.backends.cudnn.allow_tf32 = False
    print(describe(np, cupy, torch, args.device), flush=True)

    sync = make_sync(cupy, torch, args.device)
    tmeta = Tinymeta(args.device)
    torch_impl = Torch(torch, args.device) if torch is not None else None
    rows, checks = [], []
    started = time.perf_counter()
    workloads = {"w1": run_w1, "w2": run_w2}
    chosen = list(workloads) if args.only == "all" else [args.only]
    try:
        for i, name in enumerate(chosen):
            # Each workload gets an even share of what is left (and halves it between its two
            # configurations).
            left = args.budget_s - (time.perf_counter() - started)
            share = max(left / (len(chosen) - i), 1.0)
            workloads[name](args, tmeta, torch_impl, sync, share, rows, checks)
    except KeyboardInterrupt:  # a time limit (timeout -s INT): report what was measured
        print("\nbench_gpu: interrupted; the table holds the configurations that finished")
        print_table(rows, args.device)
        return 130
    print_table(rows, args.device)
    bad = [c for c in checks if not c["ok"]]
    print(
        f"\nmeta-gradient checks: {len(checks) - len(bad)}/{len(checks)} agree "
        f"(max rel diff < 1e-3); total {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "checks": checks}, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
