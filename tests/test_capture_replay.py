"""How a replay runs: what it keeps, what it drops, what it folds (tm.capture's program)."""

from __future__ import annotations

import tracemalloc

import numpy as np

import tinymeta as tm


def _peak_bytes_of(fn) -> int:
    """The most memory traced (NumPy reports its arrays to tracemalloc) while ``fn`` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


def test_replay_drops_each_intermediate_after_its_last_use():
    """A chain of 16 ops on a 1 MB array: a replay that held every intermediate to its end
    would peak at 16 MB; dropping each after the op that last reads it, about 2 MB."""
    size = 1 << 18  # float32: 1 MiB

    def step(x):
        y = x
        for _ in range(16):
            y = tm.tanh(y) * 0.5
        return y.sum()

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(size).astype(np.float32) for _ in range(3)]
    captured = tm.capture(step)
    captured(xs[0])
    assert len(captured.program) >= 32
    result = []
    peak = _peak_bytes_of(lambda: result.append(captured(xs[1])))
    assert peak < 4 * xs[1].nbytes, f"replay peaked at {peak / xs[1].nbytes:.1f} inputs' worth"
    assert np.array_equal(result[0].data, step(tm.tensor(xs[1])).data)
