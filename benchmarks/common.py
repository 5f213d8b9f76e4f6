"""Shared helpers for the benchmark scripts: thread setup, interleaved timing, BLAS speed.

``setup_threads`` must run before NumPy (or anything that imports it) is
imported: BLAS libraries read their thread count once, when they load. This
module therefore imports NumPy only inside its functions.
"""

from __future__ import annotations

import argparse
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
