"""Confidence intervals for a comparison over seeds: Student-t and percentile bootstrap, plain and paired.

A method's accuracy over ``n`` seeds is summarised by its mean and a 95% interval. Two methods run with the same
seeds (same data order, same initial model, same held-out questions) are compared by the per-seed differences,
whose interval is usually much narrower than the two separate intervals suggest (the seeds' shared luck cancels).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
"""The 0.975 quantile of Student's t with 1..15 degrees of freedom (any statistics table; 1.96 is the limit)."""


def t_quantile_975(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom (tabled to 15, then bounded).

    Beyond the table the value of 15 degrees is used: it is above the true one (2.131 against 2.042 at 30), so the
    interval errs on the wide side.
    """
    if df < 1:
        raise ValueError(f"t_quantile_975: degrees of freedom must be >= 1, got {df}")
    return T_975[min(df, len(T_975)) - 1]


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and its 95% interval ``[low, high]`` (``low == high == mean`` when ``n == 1``)."""

    mean: float
    low: float
    high: float
    n: int

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """``mean [low, high]`` with the values multiplied by ``scale`` (percent by default)."""
        m, lo, hi = (round(scale * v, digits) for v in (self.mean, self.low, self.high))
        return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def t_interval(values: Sequence[float]) -> Interval:
    """Mean and Student-t 95% interval ``mean +- t_{0.975, n-1} * sd / sqrt(n)`` of ``values``."""
    if not values:
        raise ValueError("t_interval: no values")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Interval(mean, mean, mean, 1)
    half = t_quantile_975(len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return Interval(mean, mean - half, mean + half, len(values))


def bootstrap_interval(values: Sequence[float], resamples: int = 10_000, seed: int = 0) -> Interval:
    """Mean and percentile-bootstrap 95% interval: the 2.5% and 97.5% quantiles of resampled means."""
    if not values:
        raise ValueError("bootstrap_interval: no values")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(resamples))
    low, high = means[int(0.025 * resamples)], means[min(int(0.975 * resamples), resamples - 1)]
    return Interval(statistics.fmean(values), low, high, n)


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> list[float]:
    """``a[s] - b[s]`` for every seed ``s`` both have, in seed order (unpaired seeds are left out)."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]
