"""Bootstrap confidence intervals, plain and paired. numpy only: the promotion decision and the
CLI's comparisons import this without the scorers' libraries."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> Interval:
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_resamples, data.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return Interval(float(data.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def paired_bootstrap_ci(tuned: Sequence[float], base: Sequence[float], n_resamples: int = 1000, seed: int = 0) -> Interval:
    """CI of mean(tuned − base), resampling examples jointly."""
    t, b = np.asarray(tuned, dtype=float), np.asarray(base, dtype=float)
    if t.shape != b.shape:
        raise ValueError("paired bootstrap needs the same examples for both models")
    return bootstrap_ci(t - b, n_resamples, seed)


def percent_difference(base: float | None, tuned: float | None, digits: int = 2) -> str:
    """tuned vs base in percent; n/a when base is 0 or undefined (ROUGE-2 of a base that shares no bigram)."""
    if not base or tuned is None or not math.isfinite(base) or not math.isfinite(tuned):
        return "n/a"
    return f"{100.0 * (tuned - base) / base:+.{digits}f}%"
