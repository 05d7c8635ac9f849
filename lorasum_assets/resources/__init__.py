from lorasum_assets.resources.model import LoraModelResource
from lorasum_assets.resources.profile import ProfileResource
from lorasum_assets.resources.scorer import BertScorerResource
from lorasum_assets.resources.store import LorasumStore

__all__ = ["BertScorerResource", "LoraModelResource", "LorasumStore", "ProfileResource"]
