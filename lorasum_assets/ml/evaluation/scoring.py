"""Scoring base and tuned predictions against references: per example, means, CIs and deltas."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lorasum_assets.ml.evaluation.rouge import rouge_scores
from lorasum_assets.ml.evaluation.stats import bootstrap_ci, paired_bootstrap_ci
from lorasum_assets.settings.specs import EVAL_METRICS

METRICS = EVAL_METRICS
MODELS = ("base", "tuned")
BertScoreFn = Callable[[Sequence[str], Sequence[Sequence[str]]], tuple[list[float], list[float], list[float]]]


@dataclass
class Report:
    per_example: dict[str, dict[str, list[float]]]  # model -> metric -> values
    metrics: list[dict]  # model, metric, reference_set, value, ci_low, ci_high
    empty_predictions: dict[str, int]


def score_examples(bertscore: BertScoreFn, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """Every metric of every candidate against its references (the best reference per example)."""
    p, r, f = bertscore(list(candidates), references)
    return {"bertscore_precision": p, "bertscore_recall": r, "bertscore_f1": f, **rouge_scores(list(candidates), references)}


def score_predictions(
    bertscore: BertScoreFn,
    predictions: dict[str, Sequence[str]],
    references: Sequence[Sequence[str]],
    n_resamples: int = 1000,
    seed: int = 0,
) -> Report:
    """Scores against all references (best per example) and against the first reference alone."""
    per_example: dict[str, dict[str, list[float]]] = {}
    metrics: list[dict] = []
    reference_sets = {"all": [list(r) for r in references], "first": [[r[0]] for r in references]}
    multi = any(len(r) > 1 for r in references)
    for ref_name, refs in reference_sets.items():
        if ref_name == "first" and not multi:
            continue
        scores = {model: score_examples(bertscore, predictions[model], refs) for model in MODELS}
        if ref_name == "all":
            per_example = scores
        for metric in METRICS:
            for model in MODELS:
                ci = bootstrap_ci(scores[model][metric], n_resamples, seed)
                metrics.append(dict(model=model, metric=metric, reference_set=ref_name, value=ci.mean, ci_low=ci.low, ci_high=ci.high))
            delta = paired_bootstrap_ci(scores["tuned"][metric], scores["base"][metric], n_resamples, seed)
            metrics.append(dict(model="delta", metric=metric, reference_set=ref_name, value=delta.mean, ci_low=delta.low, ci_high=delta.high))
    empty = {m: sum(1 for c in predictions[m] if not c.strip()) for m in MODELS}
    return Report(per_example=per_example, metrics=metrics, empty_predictions=empty)


def metric_value(report: Report, model: str, metric: str, reference_set: str = "all") -> dict:
    for row in report.metrics:
        if row["model"] == model and row["metric"] == metric and row["reference_set"] == reference_set:
            return row
    raise KeyError((model, metric, reference_set))
