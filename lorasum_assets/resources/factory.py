"""Resources for the active profile."""

from __future__ import annotations

import os

import dagster as dg

from lorasum_assets.home import database_location
from lorasum_assets.profiles import Profile, get_profile
from lorasum_assets.resources.model import LoraModelResource
from lorasum_assets.resources.scorer import BertScorerResource
from lorasum_assets.resources.store import LorasumStore


def build_store() -> LorasumStore:
    """The history store this environment names.

    ``LORASUM_DATABASE=md:<name>`` keeps it in MotherDuck (its extension reads ``MOTHERDUCK_TOKEN``
    from the environment, so the token never enters config); ``LORASUM_HISTORY_URI`` adds the
    per-run Parquet export that runs on many machines share.
    """
    return LorasumStore(
        database=database_location(),
        history_export_uri=os.environ.get("LORASUM_HISTORY_URI") or None,
    )


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
        "store": build_store(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
