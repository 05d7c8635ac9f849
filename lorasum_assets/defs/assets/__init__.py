"""Thin assets: config in, call ``lorasum_assets.ml``, tables to DuckDB, metadata out."""

from lorasum_assets.defs.assets.data import filtered_split, raw_dialogsum, tokenized_dataset
from lorasum_assets.defs.assets.evaluation import bertscore_report
from lorasum_assets.defs.assets.predictions import base_predictions, tuned_predictions
from lorasum_assets.defs.assets.promotion import promoted_adapter
from lorasum_assets.defs.assets.training import lora_adapter

ALL_ASSETS = [
    raw_dialogsum, filtered_split, tokenized_dataset, lora_adapter, base_predictions, tuned_predictions, bertscore_report,
    promoted_adapter,
]
