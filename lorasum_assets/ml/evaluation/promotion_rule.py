"""The champion/challenger rule: promote only when the paired CI lies wholly above a margin.

Both sides are scored per example on the same examples with the same scorer; the CI is the
paired bootstrap of mean(challenger − champion). No store and no dagster here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lorasum_assets.ml.evaluation.stats import Interval, paired_bootstrap_ci
from lorasum_assets.settings.specs import PromotionSpec


@dataclass(frozen=True)
class Verdict:
    promote: bool
    change: Interval
    n_examples: int
    reason: str


class UnpairedScoresError(ValueError):
    """The two sides were not scored on the same examples."""


def paired(challenger: Mapping[str, float], champion: Mapping[str, float]) -> tuple[list[float], list[float]]:
    """The two sides' scores in one order of example ids; both must hold the same ids."""
    if set(challenger) != set(champion):
        only = sorted(set(challenger) ^ set(champion))
        raise UnpairedScoresError(f"{len(only)} examples are scored on one side only, e.g. {only[:5]}")
    ids = sorted(challenger)
    return [challenger[i] for i in ids], [champion[i] for i in ids]


def judge(
    challenger: Mapping[str, float], champion: Mapping[str, float], rule: PromotionSpec, challenger_name: str, champion_name: str
) -> Verdict:
    """Promote ``challenger`` over ``champion`` when the paired 95% CI on ``rule.metric`` lies
    wholly above ``rule.margin``; the reason gives the figures either way."""
    ours, theirs = paired(challenger, champion)
    if not ours:
        raise UnpairedScoresError("no scored examples to compare")
    change = paired_bootstrap_ci(ours, theirs, n_resamples=rule.bootstrap_resamples, seed=rule.seed)
    figures = f"{rule.metric} {change.mean:+.4f} [{change.low:+.4f}, {change.high:+.4f}] over {champion_name} on {len(ours)} examples"
    if change.low > rule.margin:
        return Verdict(True, change, len(ours), f"promoted {challenger_name}: {figures} lies above {rule.margin:g}")
    where = "lies below" if change.high < rule.margin else "does not exclude"
    return Verdict(False, change, len(ours), f"kept {champion_name}: {challenger_name} {figures} {where} {rule.margin:g}")
