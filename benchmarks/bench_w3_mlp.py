"""W3 of BENCHMARKS.md: one plain training step of an MLP, tinymeta vs the NumPy floor.

MLP 784-256-256-10 with ReLU, batch 128, cross-entropy, SGD step, float32.
The same network is also written by hand in NumPy (forward, backward and
update: no framework at all), which is the floor tinymeta's overhead is
measured against. Both start from the same initial weights and see the same
batch; before timing, the script checks that they follow the same loss
trajectory, so the floor computes exactly what tinymeta computes.

It also measures NumPy's float32 matmul speed (the BLAS ceiling) and the time
of the step's eight matrix products alone, so every time can be read as a
fraction of what the machine's BLAS allows. PyTorch is timed too when it can
be imported (optional; never a dependency).

    OMP_NUM_THREADS=2 python benchmarks/bench_w3_mlp.py --repeats 300 --warmup 30
    python benchmarks/bench_w3_mlp.py --profile 200     # where tinymeta's time goes
    python benchmarks/bench_w3_mlp.py --profile 200 --functional    # the same for F.linear etc.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    base_parser,
    describe_machine,
    matmul_gflops,
    median,
    noise_warning,
    setup_threads,
    spread,
    time_interleaved,
)

N, D, H, C = 128, 784, 256, 10  # batch, input, hidden, classes
LR = 0.01
SHAPES = [(H, D), (H,), (H, H), (H,), (C, H), (C,)]  # W1 b1 W2 b2 W3 b3, PyTorch layout


def step_flops() -> dict:
    """Floating-point operations of one step (a multiply-add counts 2)."""
    forward = 2 * N * (D * H + H * H + H * C)
    weight_grads = forward  # dW = gy^T @ x has the forward's shape products
    input_grads = 2 * N * (H * H + H * C)  # no gradient for the data x
    elementwise = N * (3 * H + 3 * H + 8 * C) + 2 * sum(_size(s) for s in SHAPES)
    return {
        "matmul": forward + weight_grads + input_grads,
        "elementwise": elementwise,
    }


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def init_params(np, seed: int = 0) -> list:
    """PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for W and b."""
    rng = np.random.default_rng(seed)
    params = []
    for shape, fan_in in zip(SHAPES, (D, D, H, H, H, H)):
        bound = 1.0 / np.sqrt(fan_in)
        params.append(rng.uniform(-bound, bound, size=shape).astype(np.float32))
    return params


def make_batch(np, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D), dtype=np.float32)
    y = rng.integers(0, C, size=N)
    return x, y


# --- the three implementations -----------------------------------------------------------


class NumpyMLP:
    """Forward, backward and SGD written out by hand: the no-framework floor."""

    def __init__(self, np, params):
        self.np = np
        self.params = [p.copy() for p in params]
        self.rows = np.arange(N)

    def step(self, x, y) -> float:
        np = self.np
        w1, b1, w2, b2, w3, b3 = self.params
        z1 = x @ w1.T
        z1 += b1
        a1 = np.maximum(z1, 0)
        z2 = a1 @ w2.T
        z2 += b2
        a2 = np.maximum(z2, 0)
        logits = a2 @ w3.T
        logits += b3
        # cross-entropy = mean(logsumexp(logits) - logits[y]), max-shifted for stability
        m = logits.max(axis=1, keepdims=True)
        e = np.exp(logits - m)
        s = e.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(s[:, 0]) + m[:, 0] - logits[self.rows, y]))

        g = e / s  # d loss / d logits = (softmax - onehot) / N
        g[self.rows, y] -= 1.0
        g *= 1.0 / N
        gw3, gb3 = g.T @ a2, g.sum(axis=0)
        ga2 = g @ w3
        ga2 *= z2 > 0
        gw2, gb2 = ga2.T @ a1, ga2.sum(axis=0)
        ga1 = ga2 @ w2
        ga1 *= z1 > 0
        gw1, gb1 = ga1.T @ x, ga1.sum(axis=0)
        for p, gp in zip(self.params, (gw1, gb1, gw2, gb2, gw3, gb3)):
            p -= LR * gp
        return loss


def cross_entropy_tm(tm, logits, labels, rows):
    """mean_i [logsumexp(logits_i) - logits_i[y_i]], from tinymeta ops (no nn needed).

    ``rows`` is ``arange(batch)``: the pair (rows, labels) picks each row's label logit.
    """
    return (tm.logsumexp(logits, axis=1) - logits[rows, labels]).mean()


class TinymetaMLP:
    """The same net from raw tinymeta tensors and ops, trained with tinymeta.optim.SGD."""

    def __init__(self, tm, params):
        import numpy as np

        self.tm = tm
        self.params = [tm.tensor(p, requires_grad=True) for p in params]
        self.opt = tm.optim.SGD(self.params, lr=LR)
        self.rows = np.arange(N)

    def step(self, x, y) -> float:
        tm = self.tm
        w1, b1, w2, b2, w3, b3 = self.params
        h1 = tm.relu(x @ w1.T + b1)
        h2 = tm.relu(h1 @ w2.T + b2)
        logits = h2 @ w3.T + b3
        loss = cross_entropy_tm(tm, logits, y, self.rows)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def arrays(self):
        return [p.numpy() for p in self.params]


class TinymetaFunctionalMLP(TinymetaMLP):
    """The same net through tinymeta.nn.functional (linear, relu, cross_entropy), if it exists.

    These are fused ops (one graph node per layer and for the loss), so this
    variant shows what the library's own layers cost next to the raw-op
    spelling above.
    """

    def __init__(self, tm, params):
        super().__init__(tm, params)
        import tinymeta.nn.functional as F

        self.F = F

    def step(self, x, y) -> float:
        F = self.F
        w1, b1, w2, b2, w3, b3 = self.params
        h1 = F.relu(F.linear(x, w1, b1))
        h2 = F.relu(F.linear(h1, w2, b2))
        loss = F.cross_entropy(F.linear(h2, w3, b3), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()


class TorchMLP:
    """PyTorch, same net and init (only when torch imports)."""

    def __init__(self, torch, params):
        self.torch = torch
        self.params = [torch.tensor(p, requires_grad=True) for p in params]
        self.opt = torch.optim.SGD(self.params, lr=LR)

    def step(self, x, y) -> float:
        torch = self.torch
        w1, b1, w2, b2, w3, b3 = self.params
        h1 = torch.relu(x @ w1.T + b1)
        h2 = torch.relu(h1 @ w2.T + b2)
        logits = h2 @ w3.T + b3
        loss = torch.nn.functional.cross_entropy(logits, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def arrays(self):
        return [p.detach().numpy() for p in self.params]


# --- checks and measurements -------------------------------------------------------------------


def check_trajectories(np, models: dict, batch, steps: int) -> None:
    """Every model must produce the numpy floor's losses and weights, step for step."""
    losses = {name: [m.step(*batch[name]) for _ in range(steps)] for name, m in models.items()}
    ref = losses["numpy"]
    print(f"loss trajectory over {steps} steps (numpy floor): {np.round(ref, 6).tolist()}")
    for name, traj in losses.items():
        if name == "numpy":
            continue
        np.testing.assert_allclose(traj, ref, rtol=1e-5, atol=1e-6, err_msg=f"{name} losses")
        worst = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(models[name].arrays(), models["numpy"].params)
        )
        np.testing.assert_allclose(
            np.concatenate([a.ravel() for a in models[name].arrays()]),
            np.concatenate([b.ravel() for b in models["numpy"].params]),
            rtol=1e-4,
            atol=1e-6,
            err_msg=f"{name} weights",
        )
        diff = float(np.max(np.abs(np.asarray(traj) - np.asarray(ref))))
        print(
            f"  {name}: same trajectory (max |loss diff| {diff:.2e}, max |weight diff| {worst:.2e})"
        )


def time_step_matmuls(np, repeats: int, clock: str) -> float:
    """Seconds for the step's eight matrix products alone, with the same shapes and layouts."""
    rng = np.random.default_rng(2)

    def r(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    x, w1, w2, w3 = r(N, D), r(H, D), r(H, H), r(C, H)
    a1, a2, g, ga2, ga1 = r(N, H), r(N, H), r(N, C), r(N, H), r(N, H)
    products = [
        lambda: x @ w1.T,  # forward
        lambda: a1 @ w2.T,
        lambda: a2 @ w3.T,
        lambda: g.T @ a2,  # backward: weight gradients
        lambda: ga2.T @ a1,
        lambda: ga1.T @ x,
        lambda: g @ w3,  # backward: input gradients
        lambda: ga2 @ w2,
    ]
    fns = {str(i): f for i, f in enumerate(products)}
    samples = time_interleaved(fns, repeats=repeats, warmup=5, inner=10, clock=clock)
    return sum(median(s) for s in samples.values())


def profile_tinymeta(tm, np, params, batch, steps: int, functional: bool = False) -> None:
    import cProfile
    import pstats

    model = (TinymetaFunctionalMLP if functional else TinymetaMLP)(tm, params)
    for _ in range(10):
        model.step(*batch)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        model.step(*batch)
    profiler.disable()
    stats = pstats.Stats(profiler).strip_dirs()
    variant = "tinymeta-F (nn.functional)" if functional else "tinymeta (raw ops)"
    print(f"\ncProfile of {steps} {variant} steps, by own time:")
    stats.sort_stats("tottime").print_stats(25)
    print("by cumulative time:")
    stats.sort_stats("cumulative").print_stats(30)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], repeats=300, warmup=30)
    parser.add_argument("--check-steps", type=int, default=5, help="steps of the trajectory check")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="STEPS", help="cProfile this many tinymeta steps"
    )
    parser.add_argument(
        "--functional",
        action="store_true",
        help="with --profile: profile the nn.functional variant (tinymeta-F)",
    )
    args = parser.parse_args()
    threads = setup_threads(args.threads)

    import numpy as np

    import tinymeta as tm

    torch = None
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:
            torch = None

    print("W3: MLP 784-256-256-10 (ReLU), batch 128, cross-entropy, SGD step, float32")
    print(describe_machine(threads, args.clock))
    params = init_params(np)
    x, y = make_batch(np)

    if args.profile:
        profile_tinymeta(tm, np, params, (tm.tensor(x), y), args.profile, args.functional)
        return

    def fresh_models():
        models = {"numpy": NumpyMLP(np, params), "tinymeta": TinymetaMLP(tm, params)}
        batches = {"numpy": (x, y), "tinymeta": (tm.tensor(x), y)}
        models["tinymeta-F"] = TinymetaFunctionalMLP(tm, params)
        batches["tinymeta-F"] = (tm.tensor(x), y)
        if torch is not None:
            models["torch"] = TorchMLP(torch, params)
            batches["torch"] = (torch.from_numpy(x), torch.from_numpy(y))
        return models, batches

    models, batches = fresh_models()
    check_trajectories(np, models, batches, args.check_steps)
    if torch is None:
        print("  torch: not installed, skipped (optional peer)")

    models, batches = fresh_models()
    fns = {name: (lambda m=m, b=batches[name]: m.step(*b)) for name, m in models.items()}
    samples = time_interleaved(fns, repeats=args.repeats, warmup=args.warmup, clock=args.clock)

    flops = step_flops()
    peak = matmul_gflops(clock=args.clock)
    matmuls_alone = time_step_matmuls(np, repeats=max(50, args.repeats // 2), clock=args.clock)
    print(
        f"\nFLOPs per step: {flops['matmul'] / 1e6:.1f} M in 8 matmuls "
        f"+ about {flops['elementwise'] / 1e6:.2f} M elementwise"
    )
    print(f"BLAS ceiling: numpy float32 matmul 1024x1024x1024 = {peak:.1f} GFLOP/s")
    print(
        f"the step's 8 matmuls alone: {matmuls_alone * 1e3:.3f} ms "
        f"({flops['matmul'] / matmuls_alone / 1e9:.1f} GFLOP/s at these small shapes)"
    )

    floor = median(samples["numpy"])
    print(f"\nmedian of {args.repeats} interleaved steps after {args.warmup} warm-up:")
    print(
        f"{'':10s} {'ms/step':>8s} {'IQR (ms)':>15s} {'GFLOP/s':>8s} {'% of peak':>9s} "
        f"{'x numpy':>8s} {'x matmuls':>9s}"
    )
    for name, times in samples.items():
        t = median(times)
        gflops = flops["matmul"] / t / 1e9
        print(
            f"{name:10s} {t * 1e3:8.3f} {spread([s * 1e3 for s in times]):>15s} {gflops:8.1f} "
            f"{100 * gflops / peak:8.1f}% {t / floor:8.2f} {t / matmuls_alone:9.2f}"
        )
    ratio = median(samples["tinymeta"]) / floor
    per_rep = median([a / b for a, b in zip(samples["tinymeta"], samples["numpy"])])
    verdict = "within" if ratio <= 1.3 else "ABOVE"
    print(
        f"\ntinymeta / numpy floor = {ratio:.3f} (median of per-round ratios {per_rep:.3f}); "
        f"{verdict} the 1.3x target"
    )
    if "tinymeta-F" in samples:
        ratio_f = median(samples["tinymeta-F"]) / floor
        verdict_f = "within" if ratio_f <= 1.15 else "ABOVE"
        print(f"tinymeta-F / numpy floor = {ratio_f:.3f}; {verdict_f} the 1.15x target")
    if "torch" in samples:
        print(f"torch / numpy floor = {median(samples['torch']) / floor:.3f}")
    warning = noise_warning(samples)
    if warning:
        print(warning)


if __name__ == "__main__":
    main()
