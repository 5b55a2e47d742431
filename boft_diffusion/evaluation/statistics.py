"""Confidence intervals for scores pooled over runs (subject x seed) and samples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(runs: Sequence[Sequence[float]], resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mean over runs of each run's mean, with a two-level bootstrap interval: resample the runs,
    then the samples inside each drawn run, so that both the run-to-run spread (subjects, training
    seeds) and the sampling noise widen the interval. Returns (mean, low, high)."""
    arrays = [np.asarray(run, dtype=np.float64) for run in runs]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("bootstrap_ci needs at least one run, each with at least one sample")
    rng = np.random.default_rng(seed)
    estimates = np.empty(resamples)
    for k in range(resamples):
        drawn = rng.integers(len(arrays), size=len(arrays))
        estimates[k] = np.mean([arrays[i][rng.integers(arrays[i].size, size=arrays[i].size)].mean() for i in drawn])
    tail = (1 - level) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    return float(np.mean([a.mean() for a in arrays])), float(low), float(high)


def paired_bootstrap_ci(runs: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]],
                        resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean difference ``runs - baseline`` with its two-level bootstrap interval, pairing run with run
    (same subject and training seed) and sample with sample (same sampling seed). Pairing removes
    what both share (a hard subject, an unlucky sampling seed), so the interval is the one to read
    when asking whether two methods differ."""
    if len(runs) != len(baseline):
        raise ValueError(f"paired_bootstrap_ci: {len(runs)} runs against {len(baseline)} baseline runs")
    differences = []
    for index, (run, base) in enumerate(zip(runs, baseline, strict=True)):
        if len(run) != len(base):
            raise ValueError(f"paired_bootstrap_ci: run {index} has {len(run)} samples, its baseline {len(base)}")
        differences.append(np.subtract(run, base, dtype=np.float64))
    return bootstrap_ci(differences, resamples, level, seed)
