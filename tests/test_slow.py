"""Long checks, run deliberately: ``python -m pytest -m slow``."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_memory_and_time_stay_flat_over_many_meta_iterations():
    """Second-order sinusoid MAML for 10,000 meta-steps: RSS and ms/iteration do not grow."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_meta_memory.py"),
         "--iterations", "10000", "--every", "1000"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    rss = [float(r[1]) for r in rows]
    ms = [float(r[2]) for r in rows]
    assert len(rows) == 11
    assert max(rss[2:]) - rss[2] < 5.0  # MiB, after the first 1,000 steps warm everything up
    assert ms[-1] < 2.0 * min(ms[1:])  # no growth in time per iteration (noise allowed)
