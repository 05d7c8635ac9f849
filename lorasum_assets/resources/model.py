"""The model resource: one place that loads the (optionally 4-bit) base model and tokenizer."""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from lorasum_assets.home import home_subdir
from lorasum_assets.ml.generate import has_active_adapter
from lorasum_assets.ml.modeling import ModelSpec, load_model, load_tokenizer


class LoraModelResource(dg.ConfigurableResource):
    """Base model and tokenizer, loaded lazily once per process and run.

    ``model`` is a hub id, a local folder, ``builtin:tiny-llama`` or ``gguf:<package>/<file>``.
    The cached base is only ever used without an adapter in play; training loads its own copy
    because k-bit preparation changes the model it is given.
    """

    model: str
    revision: str | None = None
    quantization: str = "none"
    compute_dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    local_files_only: bool = False
    use_chat_template: bool = False
    hf_token: str | None = None

    _base: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)

    def spec(self) -> ModelSpec:
        return ModelSpec(
            model=self.model,
            revision=self.revision,
            quantization=self.quantization,
            compute_dtype=self.compute_dtype,
            device=self.device,
            trust_remote_code=self.trust_remote_code,
            local_files_only=self.local_files_only,
            cache_dir=str(home_subdir("models")),
            token=self.hf_token,
        )

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.spec())
        return self._tokenizer

    def base_model(self):
        """The shared base model. Raises if an adapter was left active in it."""
        if self._base is None:
            self._base = load_model(self.spec())
        if has_active_adapter(self._base):
            raise RuntimeError("the cached base model has an active LoRA adapter; base predictions would be contaminated")
        return self._base

    def fresh_model(self):
        """A new copy of the base model, for training to change as it needs."""
        return load_model(self.spec())
