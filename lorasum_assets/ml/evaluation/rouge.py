"""ROUGE F-measures against the best of each dialogue's references. No torch: ``rouge_score`` only."""

from __future__ import annotations

from collections.abc import Sequence

from rouge_score import rouge_scorer

from lorasum_assets.settings.specs import ROUGE_METRICS

ROUGE_TYPES = ROUGE_METRICS


def rouge_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """ROUGE F-measures with the Porter stemmer; the best reference per metric."""

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out: dict[str, list[float]] = {k: [] for k in ROUGE_TYPES}
    for cand, refs in zip(candidates, references, strict=True):
        if not cand.strip():
            for k in ROUGE_TYPES:
                out[k].append(0.0)
            continue
        # rougeLsum splits summaries on newlines; DialogSum summaries are single paragraphs.
        scores = scorer.score_multi(list(refs), cand)
        for k in ROUGE_TYPES:
            out[k].append(float(scores[k].fmeasure))
    return out
