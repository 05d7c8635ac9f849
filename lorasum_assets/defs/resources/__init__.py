from lorasum_assets.defs.resources.model import LoraModelResource
from lorasum_assets.defs.resources.profile import ProfileResource
from lorasum_assets.defs.resources.scorer import BertScorerResource
from lorasum_assets.defs.resources.store import LorasumStore

__all__ = ["BertScorerResource", "LoraModelResource", "LorasumStore", "ProfileResource"]
