"""Omniglot meta-iterations per second with 1 and 2 MPI ranks; the all-reduce's cost; a
projection of the speed-up to many ranks.

    python benchmarks/bench_mpi.py                     # R = 1 and 2, 5 launches each, interleaved
    python benchmarks/bench_mpi.py --ranks 1 2 --repeats 5 --iterations 6 --json runs/mpi.json
    python benchmarks/bench_mpi.py --synthetic         # random images in place of Omniglot

The script launches itself under ``mpiexec -n R`` (one BLAS thread per rank), alternating
the rank counts, each launch timing ``--iterations`` meta-iterations of the example's code
(``examples/maml_omniglot.py``: episodes drawn on every rank, ``share_gradients`` on this
rank's share, ``sum_over_ranks``, Adam's step) after ``--warmup`` untimed ones. A launch's
figure is its median iteration; the report gives the median over launches, with the range.

With two or more ranks, a launch also times the all-reduce alone: ``all_reduce_grads_`` on
the meta-gradient (packing, the layout check, the MPI call, unpacking), the bare
``MPI_Allreduce`` of a buffer of the same size, and one of 8 bytes (the latency).

The projection: a meta-iteration of B tasks on R ranks takes B d + s + ceil(B/R) c + A(R):
every rank draws all B episodes (d each), s does not shrink with R (Adam's step), c is the
compute per task (d, s and c are CPU times measured with R = 1: what an unshared core takes),
and A(R) is a ring all-reduce of n bytes in the alpha-beta model,
A(R) = 2 (R - 1) alpha + 2 (R - 1) / R * n * beta. It is evaluated with one task per rank
(B = R), the speed-up being over one process running the same B tasks, for this machine's
alpha and beta (shared memory, measured) and two stated networks; and again with each rank
drawing only its own episodes (ceil(B/R) d: per-episode seeds, which the examples do not do
yet), where the draws stop limiting the speed-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = {  # name: (alpha in seconds, beta in seconds per byte), stated, not measured
    "10 GbE (alpha 30 us, 1.1 GB/s)": (30e-6, 1 / 1.1e9),
    "InfiniBand HDR (alpha 2 us, 22 GB/s)": (2e-6, 1 / 22e9),
}
PROJECTED_RANKS = (8, 64, 512)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5, help="launches per rank count")
    p.add_argument("--iterations", type=int, default=6, help="timed meta-iterations a launch")
    p.add_argument("--warmup", type=int, default=2, help="untimed meta-iterations first")
    p.add_argument("--ways", type=int, default=20)
    p.add_argument("--filters", type=int, default=64, help="64: a meta-gradient of ~450 KB")
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--synthetic", action="store_true", help="random images, not Omniglot")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- one launch


def synthetic_dataset(rng, characters: int = 200, drawers: int = 20):
    """Random binary 28x28 images in the layout of ``load_omniglot``'s dataset."""
    import numpy as np

    from tinymeta.data import OmniglotDataset

    n = characters * drawers
    return OmniglotDataset(
        images=(rng.random((n, 1, 28, 28)) < 0.2).astype(np.float32),
        labels=np.repeat(np.arange(characters), drawers).astype(np.int64),
        drawer=np.tile(np.arange(1, drawers + 1), characters).astype(np.int64),
        alphabets=["synthetic"],
        characters=[("synthetic", f"character{i:03d}") for i in range(characters)],
        char_alphabet=np.zeros(characters, np.int64),
        name="synthetic",
    )


def worker(args) -> dict:
    """One launch, on every rank; rank 0's timings are returned."""
    import numpy as np
    from mpi4py import MPI

    import tinymeta as tm
    from tinymeta import distributed as dist
    from tinymeta.data import EpisodeSampler, load_omniglot
    from tinymeta.optim import Adam

    sys.path.insert(0, str(ROOT / "examples"))
    import maml_omniglot as mo

    rank, size = dist.init()
    ex = mo.parse_args(
        ["--ways", str(args.ways), "--filters", str(args.filters), "--quiet"]
        + ["--meta-batch", str(args.meta_batch)]
    )
    rng = np.random.default_rng(0)
    data = synthetic_dataset(rng) if args.synthetic else load_omniglot("small1")
    sampler = EpisodeSampler(data, ex.ways, ex.shots, ex.queries, rng=1, rotations=True)
    model = mo.build_model(ex.filters, ex.ways, rng)
    rule = mo.make_rule(ex.algo, dict(model.named_parameters()), ex)
    tensors = list(mo.meta_parameters(model, rule).values())
    outer = Adam(tensors, lr=ex.meta_lr)

    rows = []
    for i in range(args.warmup + args.iterations):
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = sampler.sample_batch(ex.meta_batch)
        drawn, cpu_drawn = time.perf_counter(), time.process_time()
        stats = mo.share_gradients(model, rule, batch, ex, first_order=False)
        computed, cpu_computed = time.perf_counter(), time.process_time()
        mo.sum_over_ranks(model, rule, [*stats, 0.0])
        reduced, cpu_reduced = time.perf_counter(), time.process_time()
        outer.step()
        stepped, cpu_stepped = time.perf_counter(), time.process_time()
        if i >= args.warmup:
            # The CPU time outside the all-reduce (a waiting rank polls: its CPU time there
            # is not work).
            cpu = (cpu_computed - cpu_start) + (cpu_stepped - cpu_reduced)
            rows.append(
                [stepped - start, drawn - start, computed - drawn, reduced - computed, cpu]
                + [cpu_drawn - cpu_start, cpu_computed - cpu_drawn]
            )
    # Every rank's rows, for the slowest rank's compute (a rank's all-reduce time includes
    # waiting for the others).
    everyone = MPI.COMM_WORLD.allgather(rows) if size > 1 else [rows]

    floats = sum(t.size for t in tensors)
    # The flat buffer of sum_over_ranks: the gradients, 4 statistics, one flag per tensor.
    buffer_bytes = 4 * (floats + 4 + len(tensors) + 1)
    found = {
        "ranks": size,
        "iteration": [r[0] for r in rows],
        "draw": [r[1] for r in rows],
        "compute": [max(rs[i][2] for rs in everyone) for i in range(len(rows))],
        "reduce_and_wait": [r[3] for r in rows],
        "cpu_outside_reduce": [max(rs[i][4] for rs in everyone) for i in range(len(rows))],
        "cpu_draw": [r[5] for r in rows],
        "cpu_compute": [r[6] for r in rows],
        "parameters": floats,
        "buffer_bytes": buffer_bytes,
        "header_bytes": 16,
    }
    if size > 1:
        found.update(time_all_reduce(tensors, buffer_bytes, dist, MPI, tm, np))
    return found if rank == 0 else {}


def time_all_reduce(tensors, buffer_bytes: int, dist, MPI, tm, np, repeats: int = 60) -> dict:
    """Median seconds of the meta-gradient's all-reduce through tinymeta, of the bare MPI
    call on as many bytes, and of an 8-byte one."""
    comm = MPI.COMM_WORLD
    for t in tensors:
        t.grad = tm.tensor(np.ones(t.shape, np.float32))

    def timed(fn, n=repeats):
        times = []
        for _ in range(n):
            comm.Barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    big = np.zeros(buffer_bytes // 4, np.float32)
    small = np.zeros(2, np.float32)
    return {
        "all_reduce_grads": timed(lambda: dist.all_reduce_grads_(tensors, op="sum")),
        "mpi_allreduce": timed(lambda: comm.Allreduce(MPI.IN_PLACE, big, op=MPI.SUM)),
        "mpi_allreduce_8_bytes": timed(
            lambda: comm.Allreduce(MPI.IN_PLACE, small, op=MPI.SUM), 4 * repeats
        ),
    }


# ----------------------------------------------------------------------------- the driver


def launch(ranks: int, args) -> dict:
    mpiexec = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}"
                           f"{os.environ.get('PATH', '')}")  # fmt: skip
    if mpiexec is None:
        sys.exit("bench_mpi: mpiexec not found (pip install -e '.[mpi]')")
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"  # one BLAS thread per rank
    argv = ["--worker", "--ways", args.ways, "--filters", args.filters]
    argv += ["--meta-batch", args.meta_batch, "--iterations", args.iterations]
    argv += ["--warmup", args.warmup] + (["--synthetic"] if args.synthetic else [])
    command = [mpiexec, "-n", str(ranks), sys.executable, __file__, *map(str, argv)]
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        sys.exit(f"bench_mpi: {' '.join(command)} failed:\n{run.stderr[-4000:]}")
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :])


def median_and_range(values: list) -> str:
    return (
        f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}] (n={len(values)})"
    )


def ring_all_reduce(ranks: int, n_bytes: float, alpha: float, beta: float) -> float:
    return 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * n_bytes * beta


def report(results: dict, args) -> dict:
    lines = []
    per_rank = {}
    for ranks, launches in sorted(results.items()):
        its = [1 / statistics.median(x["iteration"]) for x in launches]
        per_rank[ranks] = {
            "iterations_per_second": its,
            "compute": [statistics.median(x["compute"]) for x in launches],
            "draw": [statistics.median(x["draw"]) for x in launches],
            "reduce_and_wait": [statistics.median(x["reduce_and_wait"]) for x in launches],
            "iteration": [statistics.median(x["iteration"]) for x in launches],
            "cpu_outside_reduce": [statistics.median(x["cpu_outside_reduce"]) for x in launches],
            "cpu_draw": [statistics.median(x["cpu_draw"]) for x in launches],
            "cpu_compute": [statistics.median(x["cpu_compute"]) for x in launches],
        }
        lines.append(f"R={ranks}: meta-iterations/s {median_and_range(its)}")
    summary = {"per_rank": per_rank}
    if 1 in per_rank:
        base = statistics.median(per_rank[1]["iterations_per_second"])
        for ranks in [r for r in per_rank if r != 1]:
            ratio = statistics.median(per_rank[ranks]["iterations_per_second"]) / base
            summary[f"speedup_{ranks}"] = ratio
            lines.append(f"speed-up R={ranks} over R=1 (medians): {ratio:.2f}x")
            if len(per_rank[ranks]["iteration"]) == len(per_rank[1]["iteration"]):
                # Each launch over the R=1 launch just before it: drifts in the load cancel.
                paired = [
                    one / many
                    for one, many in zip(per_rank[1]["iteration"], per_rank[ranks]["iteration"])
                ]
                summary[f"paired_speedup_{ranks}"] = paired
                lines.append(f"  paired ratios of launches: {median_and_range(paired)}")
    first = next(iter(results.values()))[0]
    n_bytes = first["buffer_bytes"]
    lines.append(
        f"exchanged per meta-iteration: one all-reduce of {n_bytes:,} bytes "
        f"({first['parameters']:,} float32 gradients + statistics and flags) after one of "
        f"{first['header_bytes']} bytes (the layout check); in a ring each rank sends "
        f"2 (R-1)/R of the buffer: {n_bytes:,} bytes at R=2"
    )
    multi = [x for launches in results.values() for x in launches if x["ranks"] > 1]
    if multi:
        for key, label in (
            ("all_reduce_grads", "all_reduce_grads_ of the meta-gradient"),
            ("mpi_allreduce", "bare MPI_Allreduce, same bytes"),
            ("mpi_allreduce_8_bytes", "MPI_Allreduce of 8 bytes (latency)"),
        ):
            ms = [1e3 * x[key] for x in multi]
            summary[key + "_ms"] = ms
            lines.append(f"{label}, R={multi[0]['ranks']}: {median_and_range(ms)} ms")
    if 1 in per_rank and multi:
        # On a loaded machine the elapsed-time ratio measures the scheduler's shares too; the
        # CPU time a rank spends outside the all-reduce does not depend on the load (much).
        ranks = multi[0]["ranks"]
        cpu_one = statistics.median(per_rank[1]["cpu_outside_reduce"])
        cpu_many = statistics.median(per_rank[ranks]["cpu_outside_reduce"])
        reduce = statistics.median(x["all_reduce_grads"] for x in multi)
        estimate = cpu_one / (cpu_many + reduce)
        summary[f"cpu_time_speedup_{ranks}"] = estimate
        lines.append(
            f"CPU time per iteration outside the all-reduce: R=1 {1e3 * cpu_one:.0f} ms, "
            f"R={ranks} {1e3 * cpu_many:.0f} ms (slowest rank); with one all_reduce_grads_ "
            f"added, the speed-up on {ranks} otherwise idle cores would be {estimate:.2f}x"
        )
        summary["projection"] = projection(per_rank, multi, n_bytes, lines, args)
    return summary, lines


def projection(per_rank, multi, n_bytes, lines, args) -> dict:
    # CPU times (R=1): what a dedicated core would take, whatever the machine's load.
    one = per_rank[1]
    c = statistics.median(one["cpu_compute"]) / args.meta_batch
    d = statistics.median(one["cpu_draw"]) / args.meta_batch
    s = statistics.median(one["cpu_outside_reduce"]) - (c + d) * args.meta_batch
    ranks = multi[0]["ranks"]
    alpha = statistics.median(x["mpi_allreduce_8_bytes"] for x in multi) / (2 * (ranks - 1))
    total = statistics.median(x["mpi_allreduce"] for x in multi)
    beta = max(total - 2 * (ranks - 1) * alpha, 0.0) / (2 * (ranks - 1) / ranks * n_bytes)
    networks = {
        f"this machine, shared memory (alpha {1e6 * alpha:.1f} us, "
        f"{1e-9 / beta if beta else math.inf:.1f} GB/s, measured)": (alpha, beta),
        **NETWORKS,
    }
    lines.append(
        f"projection, one task per rank (B = R); CPU times measured with R=1: c = {1e3 * c:.1f} "
        f"ms of compute per task, d = {1e3 * d:.2f} ms to draw an episode, s = {1e3 * s:.1f} "
        "ms for the rest of an iteration:"
    )
    out = {"compute_per_task": c, "draw_per_task": d, "fixed_per_iteration": s, "networks": {}}
    for own_draws in (False, True):
        lines.append(
            "  each rank draws only its own episodes:"
            if own_draws
            else "  every rank draws the whole meta-batch (as the examples do):"
        )
        for name, (a, b) in networks.items():
            cells, rows = [], {}
            for r in PROJECTED_RANKS:
                reduce = ring_all_reduce(r, n_bytes, a, b)
                drawn = d if own_draws else r * d
                speedup = (r * d + s + r * c) / (drawn + s + c + reduce)
                rows[r] = {"all_reduce": reduce, "speedup": speedup, "efficiency": speedup / r}
                cells.append(
                    f"R={r}: {speedup:.1f}x ({100 * speedup / r:.0f}%, A={1e3 * reduce:.2f} ms)"
                )
            out["networks"][f"{name}{', own draws' if own_draws else ''}"] = rows
            lines.append(f"    {name}: " + "; ".join(cells))
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        found = worker(args)
        if found:
            print("RESULT " + json.dumps(found), flush=True)
        return
    results = {r: [] for r in args.ranks}
    for _ in range(args.repeats):
        for ranks in args.ranks:  # interleaved: drifts in the machine's load hit every R
            results[ranks].append(launch(ranks, args))
            print(f"  R={ranks}: {1 / statistics.median(results[ranks][-1]['iteration']):.3f} "
                  "meta-iterations/s", flush=True)  # fmt: skip
    summary, lines = report(results, args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (
        f"Omniglot {args.ways}-way 1-shot, {args.filters} filters, meta-batch {args.meta_batch}, "
        f"second order, {'synthetic images' if args.synthetic else 'small1'}; "
        f"{os.cpu_count()} CPUs, load average {load:.1f} at the end; one BLAS thread per rank"
    )
    print("\n".join([header, *lines]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"setup": header, "raw": results, **summary}, indent=1))


if __name__ == "__main__":
    main()
