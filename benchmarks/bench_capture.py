"""tinymeta eager vs captured (tm.capture) vs PyTorch on W1, W2, W3 and W4, side by side.

Implementations of one workload compute the same thing from the same data and initial
weights; before timing, the captured step is checked to give bit for bit what the eager
step gives over three iterations. Two ways to time:

* in one process (default): the implementations take turns, round after round
  (``common.time_interleaved``'s rotation), each sample timed with both the wall clock and
  this process's CPU time;
* ``--separate``: every implementation runs in a process of its own that imports only its
  own library (as an outside user's script would), the processes taking turns, round after
  round; each reports the median of its samples, on both clocks.

Ratios are medians over rounds of each round's ratio; below 1 the first is faster.

    python benchmarks/bench_capture.py --threads 1                 # all, one process
    python benchmarks/bench_capture.py --threads 1 --separate       # one process each
    python benchmarks/bench_capture.py --threads 1 --only w4 --rounds 5 --repeats 30
    python benchmarks/bench_capture.py --threads 1 --only w2 w2-1st --rounds 2 --w2-repeats 3

W2 (tinymeta task-vectorized, PyTorch looped and ``torch.func``) also prints its FLOP floor:
the products' GFLOP over NumPy's float32 matmul GFLOP/s on this machine.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_keep_freed_memory,
    base_parser,
    describe_machine,
    keep_freed_memory_if_asked,
    setup_threads,
    w2_floor,
)

# workload -> (description, implementations, calls per timed sample)
W1_PEERS = ("eager", "captured", "torch", "torch.func")
WORKLOADS = {
    "w1": ("W1 sinusoid MAML, 1 inner step, second order", W1_PEERS, 2),
    "w1-5": ("W1 sinusoid MAML, 5 inner steps, second order", W1_PEERS, 2),
    "w1-loop": (
        "W1 sinusoid MAML looped over tasks, 1 inner step, second order",
        ("eager", "captured", "torch"),
        1,
    ),
    "w2": ("W2 Omniglot-size conv MAML, 1 inner step, second order", W1_PEERS, 1),
    "w2-1st": ("W2 Omniglot-size conv MAML, 1 inner step, first order", W1_PEERS, 1),
    "w3": ("W3 MLP 784-256-256-10 SGD step, batch 128", ("eager", "captured", "torch"), 2),
    "w4": ("W4 double backward, x 64x100, W1 100x100", ("eager", "captured", "torch"), 10),
}


# --- the implementations: each builder returns (step, state) with ``state()`` -> arrays ------


def build(workload: str, impl: str):
    """``(step, state)``: one iteration without arguments, and the arrays to compare."""
    import numpy as np

    if impl in ("eager", "captured"):
        import tinymeta as tm

        step, state = _tinymeta(tm, np, workload)
        return (tm.capture(step) if impl == "captured" else step), state
    import torch

    torch.set_num_threads(int(_threads()))
    return _torch(torch, np, workload, vmap=impl == "torch.func")


def _threads() -> str:
    import os

    return os.environ.get("OMP_NUM_THREADS", "1")


def _tinymeta(tm, np, workload: str):
    from bench_cpu import w4_data, w4_tinymeta
    from common import Tinymeta, w1_data, w1_weights

    if workload == "w1-loop":
        return _tinymeta_w1_looped(Tinymeta("cpu"), w1_weights(np), w1_data(np))
    if workload.startswith("w1"):
        steps = 5 if workload == "w1-5" else 1
        step, gradient = Tinymeta("cpu").w1(w1_weights(np), w1_data(np), steps)
        return step, lambda: gradient()
    if workload.startswith("w2"):
        return _tinymeta_w2(Tinymeta("cpu"), np, first_order=workload == "w2-1st")
    if workload == "w3":
        return _TinymetaW3(tm, np).pair()
    step, _ = w4_tinymeta(tm, w4_data(np))
    return step, lambda: {"h": step().numpy()}


def _tinymeta_w1_looped(peer, weights, data):
    """common.Tinymeta.w1 with the tasks in a Python loop (``vectorized=False``)."""
    from common import W1_LR

    params, opt, (xs, ys, xq, yq) = peer._setup(weights, data)

    def meta_loss():
        return peer.meta.maml_loss(
            peer.mlp, params, (xs, ys), (xq, yq), peer.F.mse_loss, W1_LR, 1, vectorized=False
        )

    step, gradient = peer._wrap(params, opt, meta_loss)
    return step, lambda: gradient()


def _tinymeta_w2(peer, np, first_order: bool):
    """W2 task-vectorized; the state to compare is the parameters after the Adam steps
    (a meta-gradient at the initial weights would cost one more uncaptured iteration)."""
    from common import W2_LR, w2_data, w2_weights

    params, opt, (xs, ys, xq, yq) = peer._setup(w2_weights(np), w2_data(np))

    def meta_loss():
        return peer.meta.maml_loss(
            peer.convnet, params, (xs, ys), (xq, yq), peer.cross_entropy, W2_LR, 1,
            first_order=first_order, vectorized=True,
        )  # fmt: skip

    step, _ = peer._wrap(params, opt, meta_loss)
    return step, lambda: {k: p.numpy().copy() for k, p in params.items()}


def _torch(torch, np, workload: str, vmap: bool):
    from bench_cpu import w4_data, w4_torch
    from common import Torch, w1_data, w1_weights, w2_data, w2_weights

    if workload.startswith("w1"):
        steps = 5 if workload == "w1-5" else 1
        peer = Torch(torch, "cpu")
        build_ = peer.w1_vmap if vmap else peer.w1_loop
        return build_(w1_weights(np), w1_data(np), steps)
    if workload.startswith("w2"):
        peer = Torch(torch, "cpu")
        build_ = peer.w2_vmap if vmap else peer.w2_loop
        return build_(w2_weights(np), w2_data(np), first_order=workload == "w2-1st")
    if workload == "w3":
        return _TorchW3(torch, np).pair()
    step, _ = w4_torch(torch, w4_data(np))
    return step, lambda: {"h": step().numpy()}


class _TinymetaW3:
    """bench_w3_mlp's raw-op MLP step, returning the loss tensor (no .item() in the step)."""

    def __init__(self, tm, np):
        import bench_w3_mlp as w3

        self.tm, self.w3 = tm, w3
        self.params = [tm.tensor(p, requires_grad=True) for p in w3.init_params(np)]
        self.opt = tm.optim.SGD(self.params, lr=w3.LR)
        x, y = w3.make_batch(np)
        self.x, self.y, self.rows = tm.tensor(x), tm.tensor(y), np.arange(w3.N)

    def step(self):
        tm = self.tm
        w1, b1, w2, b2, w3, b3 = self.params
        h1 = tm.relu(self.x @ w1.T + b1)
        h2 = tm.relu(h1 @ w2.T + b2)
        loss = self.w3.cross_entropy_tm(tm, h2 @ w3.T + b3, self.y, self.rows)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss

    def pair(self):
        return self.step, lambda: {f"p{i}": p.numpy().copy() for i, p in enumerate(self.params)}


class _TorchW3:
    def __init__(self, torch, np):
        import bench_w3_mlp as w3

        self.torch = torch
        self.params = [torch.tensor(p, requires_grad=True) for p in w3.init_params(np)]
        self.opt = torch.optim.SGD(self.params, lr=w3.LR)
        x, y = w3.make_batch(np)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def step(self):
        F = self.torch.nn.functional
        w1, b1, w2, b2, w3, b3 = self.params
        h1 = self.torch.relu(self.x @ w1.T + b1)
        h2 = self.torch.relu(h1 @ w2.T + b2)
        loss = F.cross_entropy(h2 @ w3.T + b3, self.y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss

    def pair(self):
        return self.step, lambda: {}


def check_identical(workload: str) -> str:
    """Three eager and three captured iterations from equal states give equal arrays."""
    import numpy as np

    (eager, eager_state), (captured, captured_state) = (
        build(workload, "eager"),
        build(workload, "captured"),
    )
    for _ in range(3):
        eager()
        captured()
    a, b = eager_state(), captured_state()
    same = all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    return "bit-identical" if same else "DIFFERENT"


# --- timing -----------------------------------------------------------------------------------


def sample(step, calls: int) -> tuple[float, float]:
    """(wall, CPU) seconds per call over ``calls`` calls."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        step()
    return (time.perf_counter() - w0) / calls, (time.process_time() - c0) / calls


def time_in_process(workload: str, impls, args) -> dict:
    """impl -> per round (wall median, CPU median), all in this process, taking turns."""
    calls, repeats = WORKLOADS[workload][2], repeats_of(workload, args)
    steps = {impl: build(workload, impl)[0] for impl in impls}
    for step in steps.values():
        for _ in range(args.warmup * calls):
            step()
    rounds = {impl: [] for impl in impls}
    for r in range(args.rounds):
        samples = {impl: [] for impl in impls}
        for k in range(repeats):
            shift = (r * repeats + k) % len(impls)
            for impl in impls[shift:] + impls[:shift]:
                samples[impl].append(sample(steps[impl], calls))
        for impl, xs in samples.items():
            rounds[impl].append(tuple(statistics.median(c) for c in zip(*xs)))
    return rounds


def repeats_of(workload: str, args) -> int:
    """Samples per round: W2's meta-iteration takes about a second, the others milliseconds."""
    return args.w2_repeats if workload.startswith("w2") else args.repeats


def worker(spec: str, args) -> None:
    """--worker WORKLOAD:IMPL: time one implementation alone; print its medians as JSON."""
    workload, impl = spec.split(":")
    step, _ = build(workload, impl)
    calls = WORKLOADS[workload][2]
    for _ in range(args.warmup * calls):
        step()
    xs = [sample(step, calls) for _ in range(repeats_of(workload, args))]
    print(json.dumps([statistics.median(c) for c in zip(*xs)]))


def time_separately(workload: str, impls, args) -> dict:
    """impl -> per round (wall median, CPU median), each implementation in its own process."""
    rounds = {impl: [] for impl in impls}
    for r in range(args.rounds):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        for impl in order:
            command = [sys.executable, __file__, "--worker", f"{workload}:{impl}"]
            command += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
            command += ["--w2-repeats", str(args.w2_repeats)]
            command += ["--warmup", str(args.warmup)]
            command += ["--keep-freed-memory"] if args.keep_freed_memory else []
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rounds[impl].append(tuple(json.loads(out.strip().splitlines()[-1])))
    return rounds


def report(workload: str, rounds: dict) -> list:
    label = WORKLOADS[workload][0]
    impls = list(rounds)
    print(f"\n{label}")
    for impl in impls:
        wall = statistics.median(w for w, _ in rounds[impl])
        cpu = statistics.median(c for _, c in rounds[impl])
        print(f"  {impl:<11} wall {wall * 1e3:8.3f} ms   CPU {cpu * 1e3:8.3f} ms")
    rows = []
    for mine in ("eager", "captured"):
        for peer in impls:
            if peer in ("eager", "captured") and (mine == "eager" or peer == "captured"):
                continue
            cells = []
            for clock in (0, 1):
                per_round = [a[clock] / b[clock] for a, b in zip(rounds[mine], rounds[peer])]
                cells.append(statistics.median(per_round))
            rows.append((label, mine, peer, *cells))
            print(f"  {mine} / {peer}: wall {cells[0]:.2f}x, CPU {cells[1]:.2f}x")
    if workload.startswith("w2"):
        report_w2_floor(workload, rounds)
    return rows


def report_w2_floor(workload: str, rounds: dict) -> None:
    """How far each implementation's CPU time is from W2's floor: its matrix products at the
    speed of one large NumPy float32 matmul on this machine."""
    gflop, gflops, floor_s = w2_floor(first_order=workload == "w2-1st", clock="cpu")
    print(f"  FLOP floor: {gflop:.2f} GFLOP in products / {gflops:.0f} GFLOP/s (NumPy float32 "
          f"1024^3 matmul, CPU clock) = {floor_s * 1e3:.0f} ms")  # fmt: skip
    for impl, xs in rounds.items():
        cpu = statistics.median(c for _, c in xs)
        print(f"  {impl:<11} {cpu / floor_s:5.2f}x the floor")


def profile_replay(workload: str, iterations: int) -> None:
    """CPU time of the captured step's replay by recorded call (op forward, NumPy call,
    kernel, optimizer step), summed over ``iterations`` replays."""
    import collections

    step, _ = build(workload, "captured")
    step()
    program = step.program
    spent = collections.Counter()
    for _ in range(iterations):
        values = [None] * program.size
        for slot, array in program.fixed.items():
            values[slot] = array
        for name, run in zip(program.names, program.calls):
            start = time.thread_time()
            run(values)
            spent[name] += time.thread_time() - start
    counts = collections.Counter(program.names)
    total = sum(spent.values())
    print(f"\n{WORKLOADS[workload][0]}: replay of {len(program)} calls, "
          f"{total / iterations * 1e3:.3f} ms CPU per iteration")  # fmt: skip
    for name, seconds in spent.most_common(15):
        print(
            f"  {name:<28} {counts[name]:4d} calls {seconds / iterations * 1e6:9.1f} us "
            f"({seconds / total:5.1%})"
        )


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0], repeats=20, warmup=3)
    parser.add_argument("--only", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of taking turns")
    parser.add_argument("--w2-repeats", type=int, default=3, help="samples per round of W2")
    parser.add_argument("--separate", action="store_true", help="one process per implementation")
    parser.add_argument("--no-torch", action="store_true", help="tinymeta only")
    parser.add_argument("--worker", help=argparse_suppress())
    add_keep_freed_memory(parser)
    parser.add_argument(
        "--profile", action="store_true", help="where the replay's time goes, by recorded call"
    )
    args = parser.parse_args(argv)
    args.threads = setup_threads(args.threads)
    keep_freed_memory_if_asked(args)
    if args.worker:
        worker(args.worker, args)
        return 0
    if args.profile:
        for workload in args.only:
            profile_replay(workload, args.repeats)
        return 0
    print(describe_machine(args.threads, "wall and CPU"))
    mode = "one process per implementation" if args.separate else "one process, taking turns"
    print(f"{mode}; {args.rounds} rounds x {args.repeats} samples; ratios: median of rounds")
    table = []
    for workload in args.only:
        impls = [i for i in WORKLOADS[workload][1] if not (args.no_torch and "torch" in i)]
        print(f"\n{WORKLOADS[workload][0]}: captured vs eager: {check_identical(workload)}")
        timer = time_separately if args.separate else time_in_process
        table += report(workload, timer(workload, impls, args))
    print("\n| workload | tinymeta | peer | wall ratio | CPU ratio |\n|---|---|---|---:|---:|")
    for label, mine, peer, wall, cpu in table:
        print(f"| {label} | {mine} | {peer} | {wall:.2f} | {cpu:.2f} |")
    return 0


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
