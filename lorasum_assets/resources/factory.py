"""Resources for the active profile."""

from __future__ import annotations

import os

import dagster as dg

from lorasum_assets.home import database_path
from lorasum_assets.profiles import Profile, get_profile
from lorasum_assets.resources.model import LoraModelResource
from lorasum_assets.resources.scorer import BertScorerResource
from lorasum_assets.resources.store import LorasumStore


def build_resources(profile: Profile | None = None) -> dict:
    profile = profile or get_profile()
    return {
        "model": LoraModelResource(
            model=profile.model.model,
            revision=profile.model.revision,
            quantization=profile.model.quantization,
            compute_dtype=profile.model.compute_dtype,
            use_chat_template=profile.model.use_chat_template,
            trust_remote_code=profile.model.trust_remote_code,
            # Passed as an EnvVar, so the token is resolved at run time and never shown in the UI.
            hf_token=dg.EnvVar("HF_TOKEN") if os.environ.get("HF_TOKEN") else None,
        ),
        "scorer": BertScorerResource(
            model=profile.scorer.model,
            model_path=profile.scorer.model_path,
            num_layers=profile.scorer.num_layers,
            idf=profile.scorer.idf,
            rescale_with_baseline=profile.scorer.rescale_with_baseline,
        ),
        "store": LorasumStore(database=str(database_path())),
    }
