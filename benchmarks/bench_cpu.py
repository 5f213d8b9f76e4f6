"""W1-W4 of benchmarks/README.md on the CPU: tinymeta next to PyTorch and HIPS autograd.

W1 sinusoid MAML (1 and 5 inner steps second order, 1 step first order), W2
Omniglot-size conv MAML (second and first order), W3 MLP training step, W4
double backward. Peers, each only when it imports (never a dependency):
PyTorch's autograd (looping over tasks with ``autograd.grad(create_graph=True)``
for W1/W2, as learn2learn does), PyTorch's ``torch.func`` (``grad`` inside
``vmap`` over tasks, W1/W2), HIPS autograd (W1, W3, W4) and a hand-written
NumPy floor (W3, W4).

For every configuration the script first checks that all implementations
compute the same (meta-)gradient from the same data and initial weights
(float32; where that misses the tolerance, again in float64); W3 checks the
loss and weight trajectory instead. Then it times them in turn, round after
round, after a warm-up (``common.time_interleaved``), ``--runs`` times over
the whole set, and reports the best median of the runs, the spread of the
runs' medians, and the ratio tinymeta / peer (above 1: tinymeta is slower).

    python benchmarks/bench_cpu.py --threads 1 --clock cpu      # the steady reference
    python benchmarks/bench_cpu.py --threads 2 --only w1 w4
    python benchmarks/bench_cpu.py --quick                      # a smoke run
    python benchmarks/bench_cpu.py --threads 1 --profile w1     # where tinymeta's time goes
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    OUTER_LR,
    W1_LR,
    W1_TASKS,
    W2_SHOTS,
    W2_TASKS,
    W2_WAYS,
    Tinymeta,
    Torch,
    agreement,
    as_float64,
    base_parser,
    describe_machine,
    matmul_gflops,
    median,
    noise_warning,
    setup_threads,
    time_interleaved,
    w1_data,
    w1_weights,
    w2_data,
    w2_matmul_flops,
    w2_weights,
)

WORKLOADS = ("w1", "w2", "w3", "w4")
F32_TOLERANCE = 1e-3  # max |diff| / max |reference|: float32 through a second-order graph
F64_TOLERANCE = 1e-7
# Column order of the summary: the peers, and the name each one has in a comparison.
PEERS = {
    "torch": "PyTorch autograd",
    "torch.func": "PyTorch torch.func vmap",
    "hips": "HIPS autograd",
    "numpy": "NumPy by hand",
}


@dataclass
class Comparison:
    """One configuration: implementations that compute the same thing, timed side by side."""

    label: str
    steps: dict  # implementation name -> one iteration (no arguments)
    repeats: int
    inner: int = 1  # calls per timed sample, for the fast workloads
    floor_ms: float | None = None  # the FLOP floor at the machine's matmul speed, if counted
    medians: dict = field(default_factory=dict)  # name -> median seconds of each run


@dataclass
class Libraries:
    """What imported: tinymeta always; PyTorch and HIPS autograd when installed."""

    np: object
    tm: object
    tinymeta: object  # common.Tinymeta
    torch: object = None  # the torch module
    torch_maml: object = None  # common.Torch
    hips: object = None  # a HipsAutograd


def parse_args(argv=None):
    parser = base_parser(__doc__.splitlines()[0], repeats=20, warmup=2)
    parser.add_argument("--w2-repeats", type=int, default=5, help="timed rounds of W2 (slow)")
    parser.add_argument(
        "--runs", type=int, default=3, help="time the whole set this many times (best, spread)"
    )
    parser.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    parser.add_argument("--no-hips", action="store_true", help="skip HIPS autograd")
    parser.add_argument("--quick", action="store_true", help="1 run of 2 rounds (a smoke run)")
    parser.add_argument(
        "--profile",
        choices=("w1", "w1-5", "w4"),
        help="cProfile tinymeta on W1 (1 or 5 inner steps) or W4 instead of timing",
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc malloc keeps freed memory (tinymeta.backend.keep_freed_memory): no page faults "
        "on every iteration's large arrays; applies to every implementation in the process",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.w2_repeats, args.warmup, args.runs = 2, 1, 1, 1
    return args


def import_libraries(args, threads: int) -> Libraries:
    import numpy as np

    import tinymeta as tm

    libs = Libraries(np=np, tm=tm, tinymeta=Tinymeta("cpu"))
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("PyTorch is not installed: skipped (optional peer; see benchmarks/README.md)")
        else:
            torch.set_num_threads(threads)
            libs.torch, libs.torch_maml = torch, Torch(torch, "cpu")
    if not args.no_hips:
        try:
            libs.hips = HipsAutograd()
        except ImportError:
            print("HIPS autograd is not installed: skipped (optional peer)")
    return libs


# --- checks before timing ---------------------------------------------------------------------


def check_gradients(label: str, build, mismatches: list) -> dict:
    """Every implementation's gradient against the first one's; returns the float32 steps.

    ``build(wide)`` returns {name: (step, gradient)} in float32 (``wide`` False)
    or float64. A float32 gap above the tolerance is rechecked in float64,
    where rounding no longer hides a real difference.
    """
    print(f"\n{label}", flush=True)
    impls = build(False)
    grads = {name: gradient() for name, (_, gradient) in impls.items()}
    reference, *others = grads
    wide_grads = None
    for name in others:
        diff = agreement(grads[reference], grads[name])
        verdict = "ok" if diff < F32_TOLERANCE else "above the float32 tolerance"
        print(f"  gradient vs {reference}: {name:<12} max rel diff {diff:.1e} (float32) {verdict}")
        if diff >= F32_TOLERANCE:
            if wide_grads is None:
                wide_grads = {n: g() for n, (_, g) in build(True).items()}
            diff = agreement(wide_grads[reference], wide_grads[name])
            ok = diff < F64_TOLERANCE
            print(f"    float64: max rel diff {diff:.1e} {'ok' if ok else 'MISMATCH'}")
            if not ok:
                mismatches.append(f"{label}: {name}")
    return {name: step for name, (step, _) in impls.items()}


# --- the workloads ----------------------------------------------------------------------------


def w1_comparisons(args, libs: Libraries, mismatches: list) -> list:
    np = libs.np
    comparisons = []
    for steps, first_order in ((1, False), (5, False), (1, True)):

        def build(wide, steps=steps, first_order=first_order):
            weights, data = w1_weights(np), w1_data(np)
            if wide:
                weights, data = as_float64(np, weights, data)
            impls = {"tinymeta": libs.tinymeta.w1(weights, data, steps, first_order)}
            if libs.torch_maml is not None:
                impls["torch"] = libs.torch_maml.w1_loop(weights, data, steps, first_order)
                impls["torch.func"] = libs.torch_maml.w1_vmap(weights, data, steps, first_order)
            if libs.hips is not None:
                impls["hips"] = libs.hips.w1(weights, data, steps, first_order)
            return impls

        order = "1st" if first_order else "2nd"
        label = f"W1 {order}-order, {steps} inner step{'s' * (steps > 1)}, {W1_TASKS} tasks"
        stepper = check_gradients(label, build, mismatches)
        comparisons.append(Comparison(label, stepper, args.repeats))
    return comparisons


def w2_comparisons(args, libs: Libraries, mismatches: list) -> list:
    np = libs.np
    gflops = matmul_gflops(clock=args.clock)
    comparisons = []
    for first_order in (False, True):

        def build(wide, first_order=first_order):
            weights, data = w2_weights(np), w2_data(np)
            if wide:
                weights, data = as_float64(np, weights, data)
            impls = {"tinymeta": libs.tinymeta.w2(weights, data, first_order)}
            impls["tinymeta vec"] = libs.tinymeta.w2(weights, data, first_order, True)
            if libs.torch_maml is not None:
                impls["torch"] = libs.torch_maml.w2_loop(weights, data, first_order)
                impls["torch.func"] = libs.torch_maml.w2_vmap(weights, data, first_order)
            return impls

        order = "1st" if first_order else "2nd"
        label = f"W2 {order}-order, {W2_WAYS}-way {W2_SHOTS}-shot, {W2_TASKS} tasks"
        stepper = check_gradients(label, build, mismatches)
        flops = w2_matmul_flops(first_order)
        floor_ms = flops / (gflops * 1e9) * 1e3
        print(
            f"  FLOP floor: {flops / 1e9:.2f} GFLOP in products / {gflops:.0f} GFLOP/s "
            f"(NumPy float32 1024^3 matmul) = {floor_ms:.0f} ms"
        )
        comparisons.append(Comparison(label, stepper, args.w2_repeats, floor_ms=floor_ms))
    return comparisons


def w3_comparisons(args, libs: Libraries, mismatches: list) -> list:
    import bench_w3_mlp as w3

    np, tm = libs.np, libs.tm
    params = w3.init_params(np)
    x, y = w3.make_batch(np)

    def fresh_models():
        models = {"tinymeta": w3.TinymetaMLP(tm, params)}
        batches = {"tinymeta": (tm.tensor(x), y)}
        models["tinymeta-F"] = w3.TinymetaFunctionalMLP(tm, params)
        batches["tinymeta-F"] = (tm.tensor(x), y)
        models["numpy"], batches["numpy"] = w3.NumpyMLP(np, params), (x, y)
        if libs.torch is not None:
            models["torch"] = w3.TorchMLP(libs.torch, params)
            batches["torch"] = (libs.torch.from_numpy(x), libs.torch.from_numpy(y))
        if libs.hips is not None:
            models["hips"] = libs.hips.w3(params, w3.LR)
            batches["hips"] = (x, y)
        return models, batches

    label = "W3 MLP 784-256-256-10 step, batch 128"
    print(f"\n{label}")
    models, batches = fresh_models()
    try:  # the same losses and weights as the NumPy floor, step for step
        w3.check_trajectories(np, models, batches, steps=3)
    except AssertionError as e:
        print(f"  MISMATCH: {e}")
        mismatches.append(f"{label}: {e}")
    models, batches = fresh_models()
    steps = {name: (lambda m=m, b=batches[name]: m.step(*b)) for name, m in models.items()}
    return [Comparison(label, steps, args.repeats, inner=5)]


def w4_comparisons(args, libs: Libraries, mismatches: list) -> list:
    np = libs.np

    def build(wide):
        arrays = w4_data(np)
        if wide:
            arrays = {k: v.astype(np.float64) for k, v in arrays.items()}
        impls = {"tinymeta": w4_tinymeta(libs.tm, arrays)}
        impls["numpy"] = w4_numpy(np, arrays)
        if libs.torch is not None:
            impls["torch"] = w4_torch(libs.torch, arrays)
        if libs.hips is not None:
            impls["hips"] = libs.hips.w4(arrays)
        return impls

    label = f"W4 double backward, x {W4_BATCH}x{W4_FEATURES}, W1 {W4_FEATURES}x{W4_HIDDEN}"
    stepper = check_gradients(label, build, mismatches)
    return [Comparison(label, stepper, args.repeats, inner=20)]


# --- W4: the double backward alone, in each framework and by hand in NumPy --------------------
#
# f = sum(tanh(x @ W1) @ W2) with x 64x100, W1 100x100, W2 100x1 (float32);
# g = df/dW1 with a graph (create_graph=True); then h = d sum(g * g) / dW1.
# Each builder returns (step, gradient): ``step()`` computes h once, ``gradient()``
# returns {"W1": h} as a NumPy array for the agreement check.
#
# The NumPy version is the no-framework floor, derived by hand (T = tanh(x W1),
# w = W2 as a row, 1 - T^2 = tanh'):
#     g = x^T D,            D = (1 - T^2) * w
#     dL/dD = x (2 g)       (L = sum(g^2), and g is linear in D)
#     dL/dA = dL/dD * (-2 T (1 - T^2)) * w      (dD/dA, A = x W1)
#     h = x^T dL/dA
# Four matrix products: the forward's, g's, and the two of the backward.

W4_BATCH, W4_FEATURES, W4_HIDDEN = 64, 100, 100


def w4_data(np) -> dict:
    rng = np.random.default_rng(4)
    return {
        "x": rng.standard_normal((W4_BATCH, W4_FEATURES)).astype("float32"),
        "W1": (rng.standard_normal((W4_FEATURES, W4_HIDDEN)) / np.sqrt(W4_FEATURES)).astype(
            "float32"
        ),
        "W2": (rng.standard_normal((W4_HIDDEN, 1)) / np.sqrt(W4_HIDDEN)).astype("float32"),
    }


def w4_numpy(np, arrays: dict):
    x, W1, W2 = arrays["x"], arrays["W1"], arrays["W2"]
    w = W2[:, 0]

    def second_derivative():
        t = np.tanh(x @ W1)
        dtanh = 1.0 - t * t
        g = x.T @ (dtanh * w)
        grad_d = x @ (2.0 * g)
        grad_a = grad_d * (-2.0 * t * dtanh) * w
        return x.T @ grad_a

    return second_derivative, lambda: {"W1": second_derivative()}


def w4_tinymeta(tm, arrays: dict):
    x, W2 = tm.tensor(arrays["x"]), tm.tensor(arrays["W2"])
    W1 = tm.tensor(arrays["W1"], requires_grad=True)

    def second_derivative():
        f = (tm.tanh(x @ W1) @ W2).sum()
        (g,) = tm.grad(f, W1, create_graph=True)
        (h,) = tm.grad((g * g).sum(), W1)
        return h

    return second_derivative, lambda: {"W1": second_derivative().numpy()}


def w4_torch(torch, arrays: dict):
    x, W2 = torch.tensor(arrays["x"]), torch.tensor(arrays["W2"])
    W1 = torch.tensor(arrays["W1"]).requires_grad_(True)

    def second_derivative():
        f = (torch.tanh(x @ W1) @ W2).sum()
        (g,) = torch.autograd.grad(f, W1, create_graph=True)
        (h,) = torch.autograd.grad((g * g).sum(), W1)
        return h

    return second_derivative, lambda: {"W1": second_derivative().numpy()}


# --- HIPS autograd as a peer on W1, W3 and W4 ------------------------------------------------


class NumpyAdam:
    """Adam on a dict of NumPy arrays, with PyTorch's update rule (in place)."""

    def __init__(self, params: dict, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        import numpy as np

        self.np, self.params, self.lr, self.betas, self.eps = np, params, lr, betas, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads: dict) -> None:
        b1, b2 = self.betas
        self.t += 1
        step_size = self.lr / (1 - b1**self.t)
        root_correction = self.np.sqrt(1 - b2**self.t)
        for k, p in self.params.items():
            g = grads[k]
            self.m[k] *= b1
            self.m[k] += (1 - b1) * g
            self.v[k] *= b2
            self.v[k] += (1 - b2) * g * g
            p -= step_size * self.m[k] / (self.np.sqrt(self.v[k]) / root_correction + self.eps)


class HipsAutograd:
    """HIPS autograd (``pip install autograd``) on W1 (sinusoid MAML), W3 (MLP step) and W4.

    HIPS autograd differentiates plain NumPy code by tracing it: ``grad(f)(x)`` returns a
    function's gradient, and a ``grad`` inside the function being differentiated gives second
    order for free. It has no ``vmap``, so W1 loops over tasks as learn2learn does. Its outer
    optimizer is ``NumpyAdam`` (PyTorch's update rule), so that a step does the same work as
    the others'. Constructing one imports autograd (ImportError when it is not installed);
    NumPy must already be set up (threads).
    """

    def __init__(self):
        import autograd.numpy as anp
        from autograd import grad, value_and_grad
        from autograd.tracer import getval

        self.anp, self.grad, self.value_and_grad, self.getval = anp, grad, value_and_grad, getval

    def mlp(self, p: dict, x):
        anp = self.anp
        h = anp.maximum(x @ p["w1"].T + p["b1"], 0.0)
        h = anp.maximum(h @ p["w2"].T + p["b2"], 0.0)
        return h @ p["w3"].T + p["b3"]

    def logsumexp(self, z, axis: int):
        """log sum exp z along axis, shifted by the (constant) max for stability.

        The shift m cancels in the value, so its gradient cancels too: taking it
        as a constant (getval) gives the same derivative with less tracing.
        """
        anp = self.anp
        m = self.getval(z).max(axis=axis, keepdims=True)
        return anp.log(anp.sum(anp.exp(z - m), axis=axis)) + anp.squeeze(m, axis=axis)

    def mse(self, prediction, target):
        return self.anp.mean((prediction - target) ** 2)

    def w1(self, weights: dict, data: list, steps: int, first_order: bool = False):
        """W1 meta-iteration: (step, gradient) like common's builders."""
        import numpy as np

        grad, getval, mse, mlp = self.grad, self.getval, self.mse, self.mlp
        params = {k: v.copy() for k, v in weights.items()}
        opt = NumpyAdam(params, OUTER_LR)
        xs, ys, xq, yq = data

        def meta_loss(p0: dict):
            total = 0.0
            for t in range(len(xs)):
                p = p0
                for _ in range(steps):
                    g = grad(lambda p_, t=t: mse(mlp(p_, xs[t]), ys[t]))(p)
                    if first_order:  # getval strips the trace: the inner gradient is a constant
                        g = {k: getval(v) for k, v in g.items()}
                    p = {k: p[k] - W1_LR * g[k] for k in p}
                total = total + mse(mlp(p, xq[t]), yq[t])
            return total / len(xs)

        meta_gradient = grad(meta_loss)

        def step():
            opt.step(meta_gradient(params))

        def gradient() -> dict:
            return {k: np.asarray(v) for k, v in meta_gradient(params).items()}

        return step, gradient

    def w3(self, params: list, lr: float):
        """W3: same net, loss and SGD as bench_w3_mlp's implementations; an object with
        ``step(x, y) -> loss`` and ``arrays()``."""
        return _HipsMLP(self, params, lr)

    def w4(self, arrays: dict):
        anp, grad = self.anp, self.grad
        x, W1, W2 = arrays["x"], arrays["W1"], arrays["W2"]

        def f(w1):
            return anp.sum(anp.tanh(x @ w1) @ W2)

        g = grad(f)
        second = grad(lambda w1: anp.sum(g(w1) ** 2))

        def second_derivative():
            return second(W1)

        return second_derivative, lambda: {"W1": second_derivative()}


class _HipsMLP:
    def __init__(self, hips: HipsAutograd, params: list, lr: float):
        self.hips, self.params, self.lr = hips, [p.copy() for p in params], lr

    def _loss(self, params, x, y):
        import numpy as np

        anp = self.hips.anp
        w1, b1, w2, b2, w3, b3 = params
        h1 = anp.maximum(x @ w1.T + b1, 0.0)
        h2 = anp.maximum(h1 @ w2.T + b2, 0.0)
        logits = h2 @ w3.T + b3
        return anp.mean(self.hips.logsumexp(logits, axis=1) - logits[np.arange(len(y)), y])

    def step(self, x, y) -> float:
        loss, grads = self.hips.value_and_grad(self._loss)(self.params, x, y)
        for p, g in zip(self.params, grads):
            p -= self.lr * g
        return float(loss)

    def arrays(self) -> list:
        return self.params


BUILDERS = {"w1": w1_comparisons, "w2": w2_comparisons, "w3": w3_comparisons, "w4": w4_comparisons}


# --- timing and report --------------------------------------------------------------------------


def time_runs(comparisons: list, args) -> None:
    """All comparisons, ``args.runs`` times over; each run's medians go into the comparison."""
    for run in range(args.runs):
        print(f"\nrun {run + 1}/{args.runs}", flush=True)
        for c in comparisons:
            samples = time_interleaved(
                c.steps, repeats=c.repeats, warmup=args.warmup, inner=c.inner, clock=args.clock
            )
            cells = []
            for name, xs in samples.items():
                c.medians.setdefault(name, []).append(median(xs))
                cells.append(f"{name} {median(xs) * 1e3:.2f}")
            print(f"  {c.label}: {', '.join(cells)} ms", flush=True)
            warning = noise_warning(samples)
            if warning:
                print(f"  {warning}")


def ratio_cell(c: Comparison, mine: str, peer: str) -> str:
    """'best ratio [lowest-highest of the runs]' for tinymeta variant ``mine`` / ``peer``."""
    if peer not in c.medians:
        return "-"
    best = min(c.medians[mine]) / min(c.medians[peer])
    per_run = [a / b for a, b in zip(c.medians[mine], c.medians[peer])]
    if len(per_run) == 1:
        return f"{best:.2f}"
    return f"{best:.2f} [{min(per_run):.2f}-{max(per_run):.2f}]"


def print_summary(comparisons: list, args, threads: int) -> None:
    runs = f"best of {args.runs} runs" if args.runs > 1 else "1 run"
    print(
        f"\nMedian ms per iteration ({runs}; spread = (slowest - fastest) / fastest of the "
        f"runs' medians), --threads {threads} --clock {args.clock}"
    )
    for c in comparisons:
        print(f"  {c.label}")
        for name, ms in c.medians.items():
            best = min(ms)
            spread = (max(ms) - best) / best
            floor = f", {best * 1e3 / c.floor_ms:.1f}x the FLOP floor" if c.floor_ms else ""
            print(f"    {name:<13} {best * 1e3:9.3f} ms  spread {spread:5.1%}{floor}")
    print("\nRatio tinymeta / peer (best medians; [range of the per-run ratios]; < 1: faster)")
    print("| workload | tinymeta ms | " + " | ".join(PEERS.values()) + " |")
    print("|---|---:|" + "---:|" * len(PEERS))
    for c in comparisons:
        for mine in (n for n in c.medians if n.startswith("tinymeta")):
            label = c.label if mine == "tinymeta" else f"{c.label} ({mine})"
            cells = [ratio_cell(c, mine, peer) for peer in PEERS]
            print(f"| {label} | {min(c.medians[mine]) * 1e3:.2f} | " + " | ".join(cells) + " |")


def profile(args, libs: Libraries) -> None:
    """cProfile of tinymeta alone: top entries by own time, then by cumulative time."""
    import cProfile
    import pstats

    np = libs.np
    if args.profile == "w4":
        step, _ = w4_tinymeta(libs.tm, w4_data(np))
        iterations = 20 * args.repeats
    else:
        steps = 5 if args.profile == "w1-5" else 1
        step, _ = libs.tinymeta.w1(w1_weights(np), w1_data(np), steps)
        iterations = args.repeats * 5
    for _ in range(max(args.warmup, 2)):
        step()
    profiler = cProfile.Profile()
    start = time.process_time()
    profiler.enable()
    for _ in range(iterations):
        step()
    profiler.disable()
    took = (time.process_time() - start) / iterations
    print(f"cProfile of {iterations} tinymeta iterations of {args.profile}")
    print(f"({took * 1e3:.2f} ms each under the profiler)")
    stats = pstats.Stats(profiler).strip_dirs()
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(20)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = setup_threads(args.threads)
    if args.keep_freed_memory:
        from tinymeta.backend import keep_freed_memory

        print(f"malloc keeps freed memory: {keep_freed_memory()}")
    libs = import_libraries(args, threads)
    print(describe_machine(threads, args.clock))
    versions = [f"tinymeta {getattr(libs.tm, '__version__', '?')}"]
    if libs.torch is not None:
        versions.append(f"torch {libs.torch.__version__} ({libs.torch.get_num_threads()} threads)")
    if libs.hips is not None:
        from importlib.metadata import version

        versions.append(f"autograd {version('autograd')}")
    print(", ".join(versions), flush=True)
    if args.profile:
        profile(args, libs)
        return 0

    started = time.perf_counter()
    mismatches: list = []
    comparisons = []
    for name in args.only:
        comparisons += BUILDERS[name](args, libs, mismatches)
    time_runs(comparisons, args)
    print_summary(comparisons, args, threads)
    verdict = "all agree" if not mismatches else "MISMATCH in " + ", ".join(mismatches)
    print(f"\ngradient checks: {verdict}; total {time.perf_counter() - started:.0f} s")
    if args.json:
        results = {
            c.label: {n: [1e3 * s for s in ms] for n, ms in c.medians.items()} for c in comparisons
        }
        Path(args.json).write_text(
            json.dumps(
                {"threads": threads, "clock": args.clock, "median_ms_per_run": results}, indent=2
            )
        )
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
