"""Sinusoid regression tasks of the MAML paper (Finn et al., 2017, section 5.1).

Each task is ``y = A * sin(x - phase)`` with the amplitude ``A`` drawn uniformly from
[0.1, 5.0], the phase from [0, pi] and the inputs ``x`` uniformly from [-5, 5]. (This sign
convention for the phase follows the reference implementation.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from tinymeta._checks import check_int, check_real

from ._rng import RngLike, as_generator


def _check_range(name: str, bounds: tuple[float, float]) -> tuple[float, float]:
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(f"SinusoidTasks: {name} must be a (low, high) pair, got {bounds!r}")
    lo, hi = (check_real(f"{name}[{i}]", b, "SinusoidTasks") for i, b in enumerate(bounds))
    if not lo <= hi:
        raise ValueError(f"SinusoidTasks: {name} must have low <= high, got {bounds}")
    return lo, hi


@dataclass(frozen=True)
class SinusoidTask:
    """One sinusoid ``y = amplitude * sin(x - phase)``.

    ``sample`` draws from the task's own generator (split off the distribution's generator when
    the task was created), so a seeded ``SinusoidTasks`` gives reproducible task data too.
    """

    amplitude: float
    phase: float
    x_range: tuple[float, float] = (-5.0, 5.0)
    _rng: np.random.Generator = field(
        default_factory=np.random.default_rng, repr=False, compare=False
    )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Evaluate the true function (float32, same shape as ``x``)."""
        x = np.asarray(x, dtype=np.float64)
        return (self.amplitude * np.sin(x - self.phase)).astype(np.float32)

    def sample(self, k: int, rng: RngLike = None) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``k`` points: ``(x, y)``, each float32 of shape ``(k, 1)``."""
        k = check_int("k", k, "SinusoidTask.sample", low=0)
        gen = self._rng if rng is None else as_generator(rng)
        # Round x first so that y is exactly ``self(x)`` of the x that is returned.
        x = gen.uniform(self.x_range[0], self.x_range[1], size=(k, 1)).astype(np.float32)
        return x, self(x)


@dataclass(frozen=True)
class SinusoidBatch:
    """A batch of ``T`` tasks: support ``(xs, ys)`` and query ``(xq, yq)`` sets.

    Arrays are float32 with shapes ``(T, k_support, 1)`` and ``(T, k_query, 1)``; the task
    parameters are float64 ``(T,)``. Iterating yields ``xs, ys, xq, yq`` so the batch unpacks
    like a 4-tuple.
    """

    xs: np.ndarray
    ys: np.ndarray
    xq: np.ndarray
    yq: np.ndarray
    amplitudes: np.ndarray
    phases: np.ndarray

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.xs, self.ys, self.xq, self.yq))

    def __len__(self) -> int:
        return len(self.amplitudes)


class SinusoidTasks:
    """The sinusoid task distribution.

    Args:
        amplitude: ``(low, high)`` range of the uniform amplitude.
        phase: ``(low, high)`` range of the uniform phase.
        x_range: ``(low, high)`` range of the uniform inputs.
        rng: ``None``, an int seed or a ``numpy.random.Generator``; a seed makes every draw
            (tasks, batches and the tasks' own samples) deterministic.
    """

    def __init__(
        self,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, np.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        rng: RngLike = None,
    ) -> None:
        self.amplitude = _check_range("amplitude", amplitude)
        self.phase = _check_range("phase", phase)
        self.x_range = _check_range("x_range", x_range)
        self.rng = as_generator(rng)

    def __repr__(self) -> str:
        return (
            f"SinusoidTasks(amplitude={self.amplitude}, phase={self.phase}, x_range={self.x_range})"
        )

    def sample_task(self) -> SinusoidTask:
        """Draw one task (amplitude and phase) from the distribution."""
        amplitude = float(self.rng.uniform(*self.amplitude))
        phase = float(self.rng.uniform(*self.phase))
        # Seed the task's own stream from ours: deterministic, yet independent of later draws.
        task_rng = np.random.default_rng(int(self.rng.integers(2**63)))
        return SinusoidTask(amplitude, phase, self.x_range, task_rng)

    def sample_batch(self, num_tasks: int, k_support: int, k_query: int) -> SinusoidBatch:
        """Draw ``num_tasks`` tasks with ``k_support`` support and ``k_query`` query points."""
        num_tasks = check_int("num_tasks", num_tasks, "SinusoidTasks.sample_batch", low=1)
        k_support = check_int("k_support", k_support, "SinusoidTasks.sample_batch", low=0)
        k_query = check_int("k_query", k_query, "SinusoidTasks.sample_batch", low=0)
        amplitudes = self.rng.uniform(*self.amplitude, size=num_tasks)
        phases = self.rng.uniform(*self.phase, size=num_tasks)
        x = self.rng.uniform(*self.x_range, size=(num_tasks, k_support + k_query, 1))
        x32 = x.astype(np.float32)
        # Evaluate in float64 on the rounded inputs, then round once: y == task(x) exactly.
        y = amplitudes[:, None, None] * np.sin(x32.astype(np.float64) - phases[:, None, None])
        y32 = y.astype(np.float32)
        return SinusoidBatch(
            xs=np.ascontiguousarray(x32[:, :k_support]),
            ys=np.ascontiguousarray(y32[:, :k_support]),
            xq=np.ascontiguousarray(x32[:, k_support:]),
            yq=np.ascontiguousarray(y32[:, k_support:]),
            amplitudes=amplitudes,
            phases=phases,
        )
