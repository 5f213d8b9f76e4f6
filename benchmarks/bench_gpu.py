"""W1 and W2 of benchmarks/README.md on a GPU: tinymeta (device="cuda", CuPy) next to PyTorch CUDA.

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
order, on random images (the data does not change the work). "tinymeta" and
PyTorch loop over tasks; "tm vectorized" is tinymeta's task-vectorized step
(``maml_loss(vectorized=True)``, what the Omniglot example runs), eager.

"tm captured" is tinymeta's task-vectorized step (W1's "tinymeta", W2's "tm vectorized")
under ``tm.capture`` with the data as its inputs: on cuda, CUDA graphs
(tinymeta/cuda_graph.py); on the cpu, the CPU replay. On cuda it runs twice,
under the two CUDA matmul settings (``tinymeta.kernels.set_cuda_matmul``): "tm captured" with
every matmul and linear product in tinymeta's kernel, which a graph holds (W1 is then one
graph), and "tm cap cublas" with them in cuBLAS, which CuPy will not capture (a chain of
graphs, the products run between them); the convolutions of W2 are cuBLAS in both. The plain
"tinymeta" rows run under the default setting ("auto": the kernel for small products). The
number of graphs per step is printed. Before timing, three captured iterations are checked to
give bit for bit what three eager ones give (under the same setting) from equal weights. With
``--torch-graph``, "torch graph" is PyTorch with the same technique: its whole step (W1
vmapped, W2 looped; Adam with ``capturable=True``) captured as one CUDA graph with
``torch.cuda.graph``, on cuda only.

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
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402  (the models, data and checks shared with bench_cpu)
    W1_LR,
    W1_TASKS,
    W2_LR,
    W2_SHOTS,
    W2_TASKS,
    W2_WAYS,
    Tinymeta,
    Torch,
    agreement,
    w1_data,
    w1_weights,
    w2_data,
    w2_weights,
)


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
    parser.add_argument(
        "--torch-graph",
        action="store_true",
        help="also capture PyTorch's step as one CUDA graph (cuda only; see the notes above)",
    )
    parser.add_argument(
        "--no-capture", action="store_true", help="leave out the captured (CUDA graph) rows"
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds each (a smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.w1_repeats = args.w2_repeats = 2
        args.w1_warmup = args.w2_warmup = 1
    return args


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


# --- the workloads ------------------------------------------------------------------------------


def run_w1(args, tmeta, torch_impl, sync, budget_s, rows, checks):
    import numpy as np

    weights, data = w1_weights(np), w1_data(np)
    for steps in (1, 5):
        fns, grads = {}, {}
        fns["tinymeta"], grads["tinymeta"] = tmeta.w1(weights, data, steps)
        if not args.no_capture:
            add_captured_rows(fns, checks, f"W1 {steps} inner step(s)", args.device, tmeta,
                              weights, data, tmeta.mlp, tmeta.F.mse_loss, W1_LR, steps,
                              False)  # fmt: skip
        if torch_impl is not None:
            fns["torch loop"], grads["torch loop"] = torch_impl.w1_loop(weights, data, steps)
            fns["torch vmap"], grads["torch vmap"] = torch_impl.w1_vmap(weights, data, steps)
        label = f"W1 2nd-order, {steps} inner step{'s' * (steps > 1)}, {W1_TASKS} tasks"
        if torch_impl is not None and args.device == "cuda" and args.torch_graph:
            add_torch_graph(fns, checks, label, torch_impl.w1_vmap_graphed, weights, data, steps)
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
        fns["tm vectorized"], grads["tm vectorized"] = tmeta.w2(
            weights, data, first_order, vectorized=True
        )
        if not args.no_capture:
            order = "1st" if first_order else "2nd"
            add_captured_rows(fns, checks, f"W2 {order}-order", args.device, tmeta, weights,
                              data, tmeta.convnet, tmeta.cross_entropy, W2_LR, 1,
                              first_order)  # fmt: skip
        if torch_impl is not None:
            fns["torch loop"], grads["torch loop"] = torch_impl.w2_loop(weights, data, first_order)
        label = (
            f"W2 {'1st' if first_order else '2nd'}-order, {W2_WAYS}-way {W2_SHOTS}-shot, "
            f"{W2_TASKS} tasks"
        )
        if torch_impl is not None and args.device == "cuda" and args.torch_graph:
            add_torch_graph(
                fns, checks, label, torch_impl.w2_loop_graphed, weights, data, first_order
            )
        row, found = check_and_time(
            label, fns, grads, args.w2_repeats, args.w2_warmup, sync, budget_s / 2
        )
        rows.append(row)
        checks.extend(found)


def captured_step(tmeta, weights, data, forward, loss_fn, lr, steps, first_order):
    """tinymeta's meta-iteration with the data as inputs, and its state: (step, params, batch)."""
    params, opt, batch = tmeta._setup(weights, data)

    def step(xs, ys, xq, yq):
        opt.zero_grad()
        loss = tmeta.meta.maml_loss(
            forward, params, (xs, ys), (xq, yq), loss_fn, lr, steps, first_order=first_order
        )
        loss.backward()
        opt.step()
        return loss

    return step, params, batch


# The captured rows on cuda: (row name, CUDA matmul setting); on the cpu the setting does
# nothing (NumPy arrays always take NumPy's matmul): one row.
CAPTURED_ROWS = {"cuda": (("tm captured", "kernel"), ("tm cap cublas", "cublas")),
                 "cpu": (("tm captured", "kernel"),)}  # fmt: skip


def add_captured_rows(fns, checks, label, device, tmeta, weights, *config) -> None:
    for name, setting in CAPTURED_ROWS[device]:
        add_captured(fns, checks, label, name, setting, tmeta, weights, *config)


def under_setting(tmeta, setting: str, fn):
    """``fn`` made to run under the CUDA matmul setting ``setting``, and restore the one before."""
    kernels = tmeta.tm.kernels

    def run(*args):
        previous = kernels.set_cuda_matmul(setting)
        try:
            return fn(*args)
        finally:
            kernels.set_cuda_matmul(previous)

    run.__wrapped__ = fn
    return run


def add_captured(fns, checks, label, name, setting, tmeta, weights, *config) -> None:
    """Add the captured step to ``fns`` as ``name``, run under the CUDA matmul setting
    ``setting``, after checking that three captured iterations give bit for bit what three
    eager ones give under that setting; a step that cannot be captured is reported, and left
    out of the table."""
    try:
        eager, eager_params, eager_batch = captured_step(tmeta, weights, *config)
        step, params, batch = captured_step(tmeta, weights, *config)
        eager = under_setting(tmeta, setting, eager)
        captured = under_setting(tmeta, setting, tmeta.tm.capture(step))
        for _ in range(3):  # the warm-up, the capture, a replay
            eager(*eager_batch)
            captured(*batch)
        diffs = [
            float(abs(tmeta.tm.backend.to_numpy(a.data) - tmeta.tm.backend.to_numpy(b.data)).max())
            for a, b in zip(eager_params.values(), params.values())
        ]
    except Exception as e:  # a refusal or a device error: report it, time the others
        print(f"  {name}: FAILED ({type(e).__name__}: {e})", flush=True)
        checks.append({"workload": label, "against": name, "error": str(e), "ok": False})
        return
    ok = max(diffs) == 0.0
    program = captured.__wrapped__.program
    print(
        f"  {name} ({describe_program(program)}) vs eager after 3 iterations: "
        f"{'bit-identical' if ok else f'max abs diff {max(diffs):.2e} (NOT bit-identical)'}",
        flush=True,
    )
    check = {"workload": label, "against": name, "max_abs_diff": max(diffs), "ok": ok}
    if hasattr(program, "graphs"):  # on cuda
        print(
            f"    matmuls in {setting}: {program.graphs} CUDA graph(s) per step, "
            f"{program.eager_forwards} forward(s) run eagerly between them",
            flush=True,
        )
        check.update(graphs=program.graphs, eager_forwards=program.eager_forwards)
    checks.append(check)
    fns[name] = lambda: captured(*batch)


def add_torch_graph(fns, checks, label, build, *config) -> None:
    """Add PyTorch's meta-iteration captured whole as one CUDA graph (``torch graph``: W1's
    vmapped step, W2's looped one), after checking that a replay's meta-gradient is eager
    PyTorch's at the same weights (relative difference under 1e-4). A capture
    PyTorch refuses is reported and left out of the table; it is not a failure of tinymeta's."""
    print("  (capturing PyTorch's step as a CUDA graph)", flush=True)
    try:
        replay, drift = build(*config)
        diff = drift()
    except Exception as e:
        first_line = (str(e).splitlines() or [""])[0]
        print(f"  torch graph: FAILED ({type(e).__name__}: {first_line})", flush=True)
        checks.append({"workload": label, "against": "torch graph", "error": str(e), "ok": None})
        return
    ok = diff < 1e-4
    print(f"  torch graph's meta-gradient vs eager torch: max rel diff {diff:.2e} "
          f"{'ok' if ok else 'MISMATCH (left out)'}", flush=True)  # fmt: skip
    checks.append({"workload": label, "against": "torch graph", "max_rel_diff": diff, "ok": ok})
    if ok:
        fns["torch graph"] = replay


def describe_program(program) -> str:
    """What a replay runs: the graphs and optimizer steps on cuda, a count of calls on the cpu."""
    names = program.names
    return ", ".join(names) if len(names) <= 4 else f"{len(names)} recorded calls"


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
            f"  {name:<13} median {row[name]['median_ms']:9.2f} ms  "
            f"(IQR {row[name]['iqr_ms']:.2f} ms, {len(xs)} rounds)",
            flush=True,
        )
    return row, checks


def print_table(rows, device: str) -> None:
    print(
        f"\nResults (median ms per meta-iteration, device {device}; ratio = tinymeta / peer; "
        "tmvec = tm vectorized; cap = tm captured, its matmuls in tinymeta's kernel; "
        "cublas = tm cap cublas; "
        "tgraph = torch graph, PyTorch's step as one CUDA graph)"
    )
    names = ("tinymeta", "tm vectorized", "tm captured", "tm cap cublas", "torch loop",
             "torch vmap", "torch graph")  # fmt: skip
    ratios = [("tinymeta", "torch loop"), ("tinymeta", "torch vmap"),
              ("tm vectorized", "torch loop"), ("tm captured", "torch loop"),
              ("tm captured", "torch vmap"), ("tm captured", "tm cap cublas"),
              ("tm captured", "torch graph")]  # fmt: skip
    header = f"{'workload':<44} " + " ".join(f"{n:>13}" for n in names)
    header += " " + " ".join(f"{short(a) + '/' + short(b):>10}" for a, b in ratios)
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = [f"{row['workload']:<44}"]
        cells += [f"{row[n]['median_ms']:>13.2f}" if n in row else f"{'-':>13}" for n in names]
        for a, b in ratios:
            ratio = row[a]["median_ms"] / row[b]["median_ms"] if a in row and b in row else None
            cells.append(f"{ratio:>10.2f}" if ratio is not None else f"{'-':>10}")
        print(" ".join(cells))


def short(name: str) -> str:
    return {"tinymeta": "tm", "tm vectorized": "tmvec", "tm captured": "cap",
            "tm cap cublas": "cublas", "torch loop": "loop", "torch vmap": "vmap",
            "torch graph": "tgraph"}[name]  # fmt: skip


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
    bad = [c for c in checks if c["ok"] is False]  # None: a peer PyTorch could not capture
    print(
        f"\nchecks: {sum(c['ok'] is True for c in checks)}/{len(checks)} agree (meta-gradients: "
        f"max rel diff < 1e-3; tm captured: bit-identical to eager); "
        f"total {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "checks": checks}, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
