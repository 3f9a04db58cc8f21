"""Seeded bootstrap confidence intervals, shared by every metric that scores a set of samples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class BootstrapCI:
    """A percentile bootstrap interval and the replicates it came from."""

    low: float
    high: float
    confidence: float
    n_resamples: int
    seed: int
    replicates: np.ndarray = field(repr=False, compare=False)


def percentile_bootstrap(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    n_resamples: int,
    seed: int,
    confidence: float = 0.95,
) -> BootstrapCI:
    """Percentile bootstrap over `n` samples: `statistic(idx)` is evaluated on `n_resamples` index arrays.

    Each `idx` holds `n` indices drawn with replacement from `range(n)`; the statistic indexes its own
    data with it, so one helper serves features, per-image scores or anything else row-shaped. The same
    `seed` gives the same resamples, hence the same interval.
    """
    if n < 1:
        raise ValueError(f"bootstrap needs at least one sample, got n={n}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    replicates = np.array([float(statistic(rng.integers(0, n, size=n))) for _ in range(n_resamples)])
    alpha = 1.0 - confidence
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(float(low), float(high), confidence, n_resamples, seed, replicates)
