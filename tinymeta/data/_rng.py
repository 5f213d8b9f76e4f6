"""Random-generator plumbing shared by the samplers."""

from __future__ import annotations

import numpy as np

RngLike = None | int | np.random.Generator


def as_generator(rng: RngLike) -> np.random.Generator:
    """Turn ``None`` / an int seed / a ``Generator`` into a ``Generator`` (the latter as is)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be None, an int seed or a numpy Generator, got {type(rng).__name__}")
