"""The resources of a code location: the run's profile and everything derived from it."""

from __future__ import annotations

import dagster as dg

from lorasum_assets.defs.resources.lineage import LineageIOManager
from lorasum_assets.defs.resources.model import LoraModelResource
from lorasum_assets.defs.resources.preflight import RunPreflightResource
from lorasum_assets.defs.resources.profile import ProfileResource
from lorasum_assets.defs.resources.scorer import BertScorerResource
from lorasum_assets.defs.resources.store import LorasumStore
from lorasum_assets.settings.env import HF_TOKEN_ENV, get_env
from lorasum_assets.settings.profiles import Profile, get_profile, profile_name


def build_store() -> LorasumStore:
    """The history store: its catalog and data path come from ``LORASUM_HISTORY`` and
    ``LORASUM_HISTORY_DATA`` when a run starts (see ``store/lake.py``)."""
    return LorasumStore()


def build_resources(profile: Profile | str | None = None) -> dict:
    """Resources whose profile defaults to ``profile`` (else ``LORASUM_PROFILE``); each run may
    pick another profile, and override any model or scorer field, in its resource config."""
    name = profile.name if isinstance(profile, Profile) else (profile or profile_name())
    get_profile(name)  # an unknown name fails here, when the code location loads
    chosen = ProfileResource.configure_at_launch(name=name)
    # Passed as an EnvVar, so the token is resolved at run time and never shown in the UI.
    token = dg.EnvVar(HF_TOKEN_ENV) if get_env(HF_TOKEN_ENV) else None
    model = LoraModelResource.configure_at_launch(profile=chosen, hf_token=token)
    store = build_store()
    return {
        "profile": chosen,
        "model": model,
        "scorer": BertScorerResource.configure_at_launch(profile=chosen),
        "store": store,
        "io_manager": LineageIOManager(),
        "preflight": RunPreflightResource(model=model, store=store),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }
