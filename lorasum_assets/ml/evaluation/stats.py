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


@dataclass(frozen=True)
class NonInferiority:
    """A non-inferiority verdict on paired scores, with ``margin`` named before the run: the
    candidate passes when the lower bound of the paired 95% CI of candidate − reference is at least
    −margin; it fails when the CI lies wholly below −margin, or is narrower than the margin and
    still reaches below it. A wider CI that reaches below −margin cannot decide; it says so, and
    about how many examples would."""

    change: Interval
    margin: float
    examples: int

    @property
    def width(self) -> float:
        return self.change.high - self.change.low

    @property
    def passed(self) -> bool:
        return self.change.low >= -self.margin

    @property
    def decided(self) -> bool:
        return self.passed or self.change.high < -self.margin or self.width < self.margin

    def examples_needed(self) -> int:
        """About how many examples make the CI 80% of the margin wide (it narrows as 1/sqrt(n))."""
        return math.ceil(self.examples * (self.width / (0.8 * self.margin)) ** 2)

    def verdict(self) -> str:
        ci = f"{self.change.mean:+.4f} [{self.change.low:+.4f}, {self.change.high:+.4f}]"
        if self.passed:
            return f"non-inferior: the CI {ci} lies above −{self.margin}"
        if self.decided:
            return f"FAILED: the CI {ci} reaches below −{self.margin}"
        return (f"cannot decide: the CI {ci} is {self.width:.4f} wide, not narrower than the margin {self.margin}, "
                f"and reaches below −{self.margin}; about {self.examples_needed()} examples would decide")


def non_inferiority(candidate: Sequence[float], reference: Sequence[float], margin: float = 0.01,
                    n_resamples: int = 2000, seed: int = 0) -> NonInferiority:
    return NonInferiority(paired_bootstrap_ci(candidate, reference, n_resamples, seed), margin, len(candidate))
