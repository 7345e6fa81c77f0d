"""Paired differences over training seeds: mean, 95% interval and a verdict.

Rows of an ablation trained with the same seed share the evaluation noise, the reference draw and the
teacher, so their metrics are paired: the per-seed difference d_k = row_k − reference_k removes what the
seed does to both. The interval is Student's t on the mean of d (n − 1 degrees of freedom, scipy's t
quantile); with at least `BOOTSTRAP_MIN_SEEDS` seeds a percentile bootstrap of the mean of d is reported
beside it. The verdict comes from the t interval alone: 'better' when it lies wholly on the better side
of zero, 'worse' when wholly on the worse side, 'not separated' when it contains zero, and
'too few seeds' below two pairs (no interval).
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_MIN_SEEDS = 8      # below this a bootstrap of the mean has too few distinct resamples to trust
BOOTSTRAP_RESAMPLES = 10000  # resamples of the seeds (fixed generator: the interval is reproducible)
VERDICTS = ("better", "worse", "not separated", "too few seeds")


def t_interval(d, level: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t interval for the mean of `d` (n ≥ 2): mean ± t_{(1+level)/2, n−1}·sd/√n."""
    from scipy.stats import t as student_t

    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {n}")
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return float(d.mean()) - half, float(d.mean()) + half


def bootstrap_interval(d, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0):
    """Percentile bootstrap interval for the mean of `d` (seeds resampled with replacement)."""
    d = np.asarray(d, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    means = d[idx].mean(axis=1)
    return float(np.quantile(means, 0.5 - level / 2)), float(np.quantile(means, 0.5 + level / 2))


def verdict(low: float, high: float, lower_is_better: bool = True) -> str:
    """'better' / 'worse' / 'not separated' for an interval of (row − reference)."""
    if high < 0:
        return "better" if lower_is_better else "worse"
    if low > 0:
        return "worse" if lower_is_better else "better"
    return "not separated"


def paired_difference(row, reference, level: float = 0.95, lower_is_better: bool = True) -> dict:
    """Statistics of d_k = row_k − reference_k over the seeds k present in both.

    Args:
      row: per-seed metric of the compared row, a sequence or {seed: value}; None entries are skipped.
      reference: the reference row's per-seed metric, same form (pairs are matched by position or seed).
      level: confidence level of the intervals.
      lower_is_better: the metric's direction (FID, distances: True).

    Returns:
      {'n', 'mean', 'sd', 'low', 'high' (t interval; None below 2 pairs), 'boot_low', 'boot_high'
      (None below BOOTSTRAP_MIN_SEEDS pairs), 'level', 'verdict'}.
    """
    if isinstance(row, dict) or isinstance(reference, dict):
        if not (isinstance(row, dict) and isinstance(reference, dict)):
            raise ValueError("paired_difference: give both rows as {seed: value} or both as sequences")
        seeds = sorted(k for k in row if k in reference and row[k] is not None and reference[k] is not None)
        pairs = [(row[k], reference[k]) for k in seeds]
    else:
        if len(row) != len(reference):
            raise ValueError(f"paired_difference: {len(row)} row values vs {len(reference)} reference values")
        pairs = [(a, b) for a, b in zip(row, reference) if a is not None and b is not None]
    d = np.array([float(a) - float(b) for a, b in pairs], dtype=np.float64)
    out = {"n": int(d.size), "mean": float(d.mean()) if d.size else None,
           "sd": float(d.std(ddof=1)) if d.size > 1 else None, "low": None, "high": None,
           "boot_low": None, "boot_high": None, "level": level, "verdict": "too few seeds"}
    if d.size >= 2:
        out["low"], out["high"] = t_interval(d, level)
        out["verdict"] = verdict(out["low"], out["high"], lower_is_better)
    if d.size >= BOOTSTRAP_MIN_SEEDS:
        out["boot_low"], out["boot_high"] = bootstrap_interval(d, level)
    return out


def format_difference(stats: dict, decimals: int = 3) -> str:
    """'+0.012 [−0.004, +0.028] not separated' (bootstrap interval appended in braces when present)."""
    if stats["n"] == 0:
        return "—"
    if stats["low"] is None:
        return f"{stats['mean']:+.{decimals}f} (n = 1)"
    text = f"{stats['mean']:+.{decimals}f} [{stats['low']:+.{decimals}f}, {stats['high']:+.{decimals}f}]"
    if stats["boot_low"] is not None:
        text += f" {{{stats['boot_low']:+.{decimals}f}, {stats['boot_high']:+.{decimals}f}}}"
    return f"{text} {stats['verdict']}"
