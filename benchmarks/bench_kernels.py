"""Kernels: start-up cost, fused batch norm against the composed one, Numba against NumPy.

    python benchmarks/bench_kernels.py [--threads 1 --clock cpu] [--repeats 15] [--w2]
    python benchmarks/bench_kernels.py --startup-only

Prints (a) ``import tinymeta`` plus the first call of every kernel (float32 and float64) in a
fresh process, with an empty Numba cache (the compile time) and again with it warm (the
target is under 2 s); (b) batch norm forward + backward (and a double backward, as
second-order MAML runs it) on W2 shapes, fused against the composed formula it replaced, and
for the double backward also the fused forward/backward with the second derivatives from
tinymeta ops (the kernel's rule run on tensors, as when a graph is recorded); (b2)
cross-entropy, the fused op against log_softmax + nll_loss, on W2/W3 logits; (c) each kernel
under Numba against its vectorized NumPy reference; with ``--w2``, (d) W2's second-order
meta-iteration (bench_w2_cpu.py), looped and task-vectorized, with the batch-norm double
backward fused and composed. Medians in ms.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    base_parser,
    describe_machine,
    median,
    noise_warning,
    setup_threads,
    time_interleaved,
)

FIRST_CALLS = """
import time
t0 = time.perf_counter()
import numpy as np
import tinymeta
import tinymeta.nn
from tinymeta import kernels
t1 = time.perf_counter()
kernels.softmax_xent_forward(np.ones((3, 5)), np.zeros(3, np.int64))  # imports Numba
t2 = time.perf_counter()
for dt in (np.float32, np.float64):
    x = np.ones((1, 2, 3, 4), dt)
    p = np.ones(3, dt)
    y, mean, inv_std = kernels.bn_forward(x, p, p, 1e-5)
    kernels.bn_stats(x, 1e-5)
    kernels.bn_backward(x, x, mean, inv_std, p)
    kernels.bn_double_backward(x, x, mean, inv_std, p, ggx=x, ggw=p, ggb=p)
    for k in (2, 3):  # the 2x2 loops and the general ones
        image = np.ones((1, 2, 6, 6), dt)
        y, argmax = kernels.maxpool2d_argmax(image, k, k, k, k)
        kernels.maxpool2d_scatter(y, argmax, k, k, k, k, 6, 6)
        kernels.maxpool2d_gather(image, argmax, k, k, k, k)
    kernels.col2im(kernels.im2col(image, 3, 3, 1, 1, 1, 1), 6, 6, 1, 1, 1, 1)
    kernels.winograd_input_adjoint(kernels.winograd_input(image, 1, 1), 6, 6, 1, 1)
    kernels.winograd_output(kernels.winograd_output_adjoint(image, 3, 3), 6, 6)
    loss, probs = kernels.softmax_xent_forward(np.ones((3, 5), dt), np.zeros(3, np.int64))
    kernels.softmax_xent_backward(probs, np.zeros(3, np.int64), loss)
    big = np.ones(8192, dt)  # above the size where these hand over to NumPy
    kernels.relu_backward(big, big)
    kernels.sgd_update_(big, big, 0.1)
t3 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t0:.3f} {kernels.backend()}")
"""


# Numba's own share of the start-up: its import, and the set-up its first call runs (the
# typing and lowering registries, even when the code comes from the cache), with one trivial
# cached function.
NUMBA_ALONE = """
import time
t0 = time.perf_counter()
import numpy as np
import trivial_kernel
trivial_kernel.add_one(np.ones(3))
print(f"{time.perf_counter() - t0:.3f}")
"""

TRIVIAL_KERNEL = """
import numba

@numba.njit(cache=True)
def add_one(x):
    return x + 1.0
"""


def _run_fresh(code: str, env: dict) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return out.stdout.split()


def first_call_times(threads: int, warm_runs: int = 5) -> None:
    print("(a) import tinymeta + first call of every kernel (fresh process, seconds)")
    print("  import: tinymeta, tinymeta.nn and tinymeta.kernels; first call: the first kernel")
    print("  call, which imports and sets up Numba; total: import + every kernel, both dtypes")
    print("  Numba alone: numpy + Numba's import + one cached trivial function, in the same runs")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, TINYMETA_KERNELS="numba")
        with open(os.path.join(cache, "trivial_kernel.py"), "w") as f:
            f.write(TRIVIAL_KERNEL)
        alone_env = dict(env, PYTHONPATH=os.pathsep.join([cache, env.get("PYTHONPATH", "")]))
        totals, alone = [], []
        for run in range(1 + warm_runs):  # alternated, so that both see the same load
            imported, first, total, backend = _run_fresh(FIRST_CALLS, env)
            alone.append(float(_run_fresh(NUMBA_ALONE, alone_env)[0]))
            label = "cold cache (compiles)" if run == 0 else f"warm cache, run {run}"
            print(
                f"  {label:24s} import {float(imported):5.2f}  first call {float(first):5.2f}  "
                f"total {float(total):6.2f}  ({backend}); Numba alone {alone[-1]:5.2f}"
            )
            totals.append(float(total))
        warm, alone = sorted(totals[1:]), sorted(alone[1:])
        print(
            f"  warm total: median {median(warm):.2f}, best {warm[0]:.2f} (target: under 2 s); "
            f"Numba alone: median {median(alone):.2f}, best {alone[0]:.2f}"
        )


def composed_batch_norm(x, w, b, eps=1e-5):
    """The previous F.batch_norm (training): about ten differentiable ops."""
    from tinymeta.ops.reductions import mean

    axes = (1, 3, 4) if x.ndim == 5 else (0, 2, 3)
    shape = (1,) * (x.ndim - 4) + (1, -1, 1, 1)
    mu = mean(x, axes, keepdims=True)
    centred = x - mu
    var = mean(centred * centred, axes, keepdims=True)
    return centred * ((var + eps) ** -0.5 * w.reshape(shape)) + b.reshape(shape)


class ComposedSecondDerivatives:
    """Within this context the batch-norm gradient nodes take their second derivatives from
    tinymeta ops (the rule they record when a graph is being recorded) even with grad mode off,
    instead of from the double-backward kernel.
    """

    def __enter__(self):
        from tinymeta.nn import batchnorm

        self.module, self.saved = batchnorm, batchnorm.is_grad_enabled
        batchnorm.is_grad_enabled = lambda: True  # what _second_derivatives asks; ops still see off

    def __exit__(self, *exc):
        self.module.is_grad_enabled = self.saved
        return False


def batch_norm_cases(np, tm, F, args):
    print("\n(b) batch norm on W2 shapes, float32 channels-last: fused vs composed (ms)")
    print("  bwd^2 composed: fused forward and backward, second derivatives from composed ops")
    print(
        f"  {'input shape':24s} {'pass':>14s} {'fused':>8s} {'bwd^2 composed':>15s} "
        f"{'composed':>9s} {'ratio':>6s}"
    )
    rng = np.random.default_rng(0)
    shapes = [(n, 64, s, s) for n in (10, 50) for s in (28, 14, 7)] + [(8, 10, 64, 14, 14)]
    all_samples = {}
    for shape in shapes:
        nhwc = rng.standard_normal(shape[:-3] + shape[-2:] + shape[-3:-2]).astype(np.float32)
        order = tuple(range(len(shape) - 3)) + (len(shape) - 1, len(shape) - 3, len(shape) - 2)
        x = tm.tensor(nhwc, requires_grad=True)
        x = tm.Tensor(x.data.transpose(order), requires_grad=True)  # NCHW view, NHWC memory
        w = tm.tensor(rng.standard_normal(64).astype(np.float32), requires_grad=True)
        b = tm.tensor(rng.standard_normal(64).astype(np.float32), requires_grad=True)
        gy = tm.tensor(rng.standard_normal(shape).astype(np.float32))

        def fused(x=x, w=w, b=b):
            return F.batch_norm(x, None, None, w, b, training=True)

        def composed(x=x, w=w, b=b):
            return composed_batch_norm(x, w, b)

        def first(op, gy=gy, x=x, w=w, b=b):
            return lambda: tm.grad((op() * gy).sum(), [x, w, b])

        def second(op, gy=gy, x=x, w=w, b=b):
            def run():
                gs = tm.grad((op() * gy).sum(), [x, w, b], create_graph=True)
                return tm.grad(sum((g * g).sum() for g in gs), [x, w, b], allow_unused=True)

            return run

        def old_second(op=fused):
            run = second(op)

            def run_composed():
                with ComposedSecondDerivatives():
                    return run()

            return run_composed

        for label, make in (("fwd+bwd", first), ("fwd+bwd+bwd^2", second)):
            variants = {"fused": make(fused), "composed": make(composed)}
            if make is second:
                variants["bwd^2 composed"] = old_second()
            samples = time_interleaved(variants, args.repeats, args.warmup, clock=args.clock)
            f, c = median(samples["fused"]) * 1e3, median(samples["composed"]) * 1e3
            old = f"{median(samples['bwd^2 composed']) * 1e3:15.2f}" if make is second else " " * 15
            print(f"  {str(shape):24s} {label:>14s} {f:8.2f} {old} {c:9.2f} {c / f:5.1f}x")
            all_samples[f"{shape} {label}"] = samples["fused"]
    return all_samples


def cross_entropy_cases(np, tm, F, args):
    print("\n(b2) cross-entropy on W2/W3 logits, float32: fused op vs log_softmax + nll (us)")
    rng = np.random.default_rng(2)
    all_samples = {}
    for shape in ((5, 5), (25, 5), (200, 5), (128, 10)):
        z = tm.tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=True)
        labels = rng.integers(0, shape[1], shape[0])

        def composed(z, labels):
            return F.nll_loss(F.log_softmax(z, 1), labels)

        def first(loss_fn, z=z, labels=labels):
            return lambda: tm.grad(loss_fn(z, labels), [z])

        def second(loss_fn, z=z, labels=labels):
            def run():
                (g,) = tm.grad(loss_fn(z, labels), [z], create_graph=True)
                return tm.grad((g * g).sum(), [z])

            return run

        for label, make in (("fwd+bwd", first), ("fwd+bwd+bwd^2", second)):
            samples = time_interleaved(
                {"fused": make(F.cross_entropy), "composed": make(composed)},
                args.repeats,
                args.warmup,
                inner=100,
                clock=args.clock,
            )
            f, c = median(samples["fused"]) * 1e6, median(samples["composed"]) * 1e6
            print(f"  {str(shape):12s} {label:>14s} fused {f:7.1f} composed {c:7.1f} {c / f:5.2f}x")
            all_samples[f"xent {shape} {label}"] = samples["fused"]
    return all_samples


def kernel_cases(np, kernels, args):
    print("\n(c) each kernel: Numba vs the NumPy reference, float32 (ms)")
    print(f"  {'kernel':40s} {'numba':>8s} {'numpy':>8s} {'ratio':>6s}")
    from tinymeta.kernels import numba_impl, reference

    rng = np.random.default_rng(1)
    n, c, s = 50, 64, 28
    nhwc = rng.standard_normal((n, s, s, c)).astype(np.float32)
    x4 = nhwc.transpose(0, 3, 1, 2)  # NCHW, channels-last memory
    x = x4.reshape(1, n, c, s * s)
    gy = rng.standard_normal((n, s, s, c)).astype(np.float32).transpose(0, 3, 1, 2)
    gy = gy.reshape(1, n, c, s * s)
    w = np.ones((1, c), np.float32)
    ggx = rng.standard_normal((n, s, s, c)).astype(np.float32).transpose(0, 3, 1, 2)
    ggx = ggx.reshape(1, n, c, s * s)
    mean, inv_std = reference.bn_stats(x, 1e-5)
    logits = rng.standard_normal((25, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 25)
    loss, probs = reference.softmax_xent_forward(logits, labels)
    tiles = reference.winograd_input(x4, 1, 1)  # (16, N, 14, 14, C): 2x2 tiles of 28x28
    cases = {
        f"bn_stats {x4.shape}": lambda m: m.bn_stats(x, 1e-5),
        f"bn_forward {x4.shape}": lambda m: m.bn_forward(x, w, w, 1e-5),
        f"bn_backward {x4.shape}": lambda m: m.bn_backward(gy, x, mean, inv_std, w),
        f"bn_double_backward {x4.shape}": lambda m: m.bn_double_backward(
            gy, x, mean, inv_std, w, ggx, w, w
        ),
        f"maxpool2d_argmax 2x2 {x4.shape}": lambda m: m.maxpool2d_argmax(x4, 2, 2, 2, 2),
        f"winograd_input {x4.shape}": lambda m: m.winograd_input(x4, 1, 1),
        f"winograd_input_adjoint {x4.shape}": lambda m: m.winograd_input_adjoint(tiles, s, s, 1, 1),
        f"winograd_output {x4.shape}": lambda m: m.winograd_output(tiles, s, s),
        f"winograd_output_adjoint {x4.shape}": lambda m: m.winograd_output_adjoint(x4, 14, 14),
        "softmax_xent_forward (25, 5)": lambda m: m.softmax_xent_forward(logits, labels),
        "softmax_xent_backward (25, 5)": lambda m: m.softmax_xent_backward(probs, labels, loss),
    }
    all_samples = {}
    for name, call in cases.items():
        samples = time_interleaved(
            {
                "numba": lambda call=call: call(numba_impl),
                "numpy": lambda call=call: call(reference),
            },
            args.repeats,
            args.warmup,
            inner=1 if "xent" not in name else 200,
            clock=args.clock,
        )
        nb, ref = median(samples["numba"]) * 1e3, median(samples["numpy"]) * 1e3
        print(f"  {name:40s} {nb:8.3f} {ref:8.3f} {ref / nb:5.1f}x")
        all_samples[name] = samples["numba"]
    return all_samples


def w2_cases(args):
    print("\n(d) W2 second-order meta-iteration: batch-norm double backward fused vs composed (ms)")
    from bench_w2_cpu import build_w2, w2_batch, w2_meta_step

    batch = w2_batch()
    all_samples = {}
    for mode in ("looped", "vectorized"):  # each pair on its own: their memory use differs
        vectorized = mode == "vectorized"
        step, _ = w2_meta_step(build_w2(), batch, first_order=False, vectorized=vectorized)

        def composed_step(step=step):
            with ComposedSecondDerivatives():
                step()

        samples = time_interleaved(
            {"fused": step, "composed": composed_step}, args.repeats, args.warmup, clock=args.clock
        )
        f, c = median(samples["fused"]) * 1e3, median(samples["composed"]) * 1e3
        print(f"  {mode:12s} fused {f:8.1f}  composed {c:8.1f}  {c / f:5.2f}x")
        all_samples.update({f"W2 {mode}, {k}": v for k, v in samples.items()})
    return all_samples


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], repeats=15, warmup=3)
    parser.add_argument("--skip-startup", action="store_true", help="skip (a)")
    parser.add_argument("--startup-only", action="store_true", help="only (a)")
    parser.add_argument("--w2", action="store_true", help="also (d), W2's meta-iteration")
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    import numpy as np

    import tinymeta as tm
    import tinymeta.nn.functional as F
    from tinymeta import kernels

    print(describe_machine(threads, args.clock), f"kernels: {kernels.backend()}")
    if not args.skip_startup:
        first_call_times(threads)
    if args.startup_only:
        return
    start = time.perf_counter()
    samples = batch_norm_cases(np, tm, F, args)
    samples.update(cross_entropy_cases(np, tm, F, args))
    samples.update(kernel_cases(np, kernels, args))
    if args.w2:
        samples.update(w2_cases(args))
    warning = noise_warning(samples)
    if warning:
        print(warning)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
