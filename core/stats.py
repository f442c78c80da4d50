"""Confidence intervals for held-out metrics: the paired bootstrap over prompts.

Round N and round 0 answer the same held-out prompts, so each prompt gives one
paired difference (round N's reward minus round 0's, its pass minus round 0's,
its win against round 0 minus the 0.5 of a tie). Resampling prompts with
replacement and taking the mean difference each time gives the percentile
interval. A run of several seeds is pooled the same way: each prompt's
differences are averaged over the seeds first, then the prompts resampled, so
the interval is over prompts as the report of one seed's is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Fixed so that a metrics.json rebuilt from the same answers has the same interval.
BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 10_000
LEVEL = 0.95
# A bound within this of 0 counts as 0. Per-prompt differences averaged over
# seeds are fractions such as 1/3, and their float means leave a residue near
# 1e-17 where the exact bound is 0: rounding must never decide a verdict.
ZERO_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Interval:
    """The observed mean difference and its bootstrap interval."""
    difference: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > ZERO_TOLERANCE or self.high < -ZERO_TOLERANCE

    def as_dict(self) -> dict[str, float]:
        return {"difference": self.difference, "low": self.low, "high": self.high}


def paired_bootstrap(differences: Sequence[float] | np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> Interval:
    """Percentile interval of the mean of per-prompt paired differences.

    `differences` is one value per prompt, or an array [seeds, prompts] whose
    columns are averaged over the seeds before the prompts are resampled.
    """
    values = np.asarray(differences, dtype=np.float64)
    if values.ndim == 2:
        values = values.mean(axis=0)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("paired_bootstrap needs one or more per-prompt differences")
    if not np.all(np.isfinite(values)):
        raise ValueError("paired_bootstrap got a difference that is not finite")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError("paired_bootstrap needs resamples >= 1 and 0 < level < 1")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    # In blocks, so that many prompts times many resamples never needs one huge index array.
    block = max(1, 2_000_000 // values.size)
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        means[start:stop] = values[rng.integers(0, values.size, size=(stop - start, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(values.mean()), float(low), float(high))
