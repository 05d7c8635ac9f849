"""How a base model loads on this machine: its settings with the model cache under LORASUM_HOME.
The model resource and the CLI both build a model's ``ModelSpec`` here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorasum_assets.runtime.home import home_subdir
from lorasum_assets.settings.specs import ModelChoice

if TYPE_CHECKING:
    from lorasum_assets.ml.models.loading import ModelSpec


def base_model_spec(choice: ModelChoice, *, device: str = "auto", local_files_only: bool = False,
                    token: str | None = None) -> ModelSpec:
    # ml.models.loading imports torch: only where a model is about to load
    from lorasum_assets.ml.models.loading import model_spec

    return model_spec(choice, device=device, local_files_only=local_files_only, cache_dir=str(home_subdir("models")), token=token)
