"""The champion/challenger rule on its own: pairing by example id, the margin, and its refusals."""

import random

import pytest

from lorasum_assets.ml.evaluation.promotion_rule import UnpairedScoresError, judge, paired
from lorasum_assets.settings.specs import PromotionSpec

IDS = [f"d{i:02d}" for i in range(40)]


def scores(values) -> dict[str, float]:
    return dict(zip(IDS, values, strict=True))


def test_pairs_by_example_id_whatever_the_order():
    challenger = {"b": 0.2, "a": 0.1, "c": 0.3}
    champion = {"c": 0.6, "a": 0.4, "b": 0.5}
    assert paired(challenger, champion) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])


def test_a_clear_win_is_promoted_and_the_reason_gives_the_figures():
    rng = random.Random(0)
    champion = [rng.uniform(0.4, 0.6) for _ in IDS]
    verdict = judge(scores([c + 0.05 + rng.uniform(-0.01, 0.01) for c in champion]), scores(champion), PromotionSpec(), "new", "old")
    assert verdict.promote and verdict.n_examples == 40
    assert 0.04 < verdict.change.low < verdict.change.mean < verdict.change.high < 0.06
    assert verdict.reason.startswith("promoted new: bertscore_f1 +0.05") and "lies above 0" in verdict.reason


def test_a_win_smaller_than_the_margin_keeps_the_champion():
    rng = random.Random(1)
    champion = [rng.uniform(0.4, 0.6) for _ in IDS]
    challenger = scores([c + 0.05 + rng.uniform(-0.01, 0.01) for c in champion])
    verdict = judge(challenger, scores(champion), PromotionSpec(margin=0.1), "new", "old")
    assert not verdict.promote and verdict.change.high < 0.1
    assert verdict.reason.startswith("kept old: new bertscore_f1 +0.05") and "lies below 0.1" in verdict.reason


def test_noise_around_zero_is_not_a_win():
    rng = random.Random(2)
    champion = [rng.uniform(0.4, 0.6) for _ in IDS]
    challenger = scores([c + (0.03 if i % 2 else -0.03) for i, c in enumerate(champion)])  # mean change exactly 0
    verdict = judge(challenger, scores(champion), PromotionSpec(), "new", "old")
    assert not verdict.promote and verdict.change.low < 0 < verdict.change.high
    assert "does not exclude 0" in verdict.reason


def test_scores_on_different_examples_are_refused_naming_them():
    champion = scores([0.5] * 40)
    challenger = {**champion, "extra": 0.9}
    del challenger["d00"]
    with pytest.raises(UnpairedScoresError, match=r"2 examples are scored on one side only, e.g. \['d00', 'extra'\]"):
        judge(challenger, champion, PromotionSpec(), "new", "old")


def test_no_scores_at_all_are_refused():
    with pytest.raises(UnpairedScoresError, match="no scored examples"):
        judge({}, {}, PromotionSpec(), "new", "old")
