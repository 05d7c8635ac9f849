"""The model resource: one place that loads the (optionally 4-bit) base model and tokenizer.

torch, transformers and peft are imported when a model is loaded, not when the definitions are:
every Dagster process imports this module.
"""


import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import PrivateAttr

from lorasum_assets.defs.resources.profile import ProfileResource
from lorasum_assets.runtime.models import base_model_spec
from lorasum_assets.settings.config import config_class, resolve
from lorasum_assets.settings.specs import ModelChoice
from lorasum_assets.store.references import BaseModelRef

if TYPE_CHECKING:
    from lorasum_assets.ml.models.loading import ModelSpec


class _ModelResourceBase(dg.ConfigurableResource):
    """The base model and its tokenizer, loaded when a step first needs them.

    Every field left unset takes the run's profile's value. ``model`` is a Hugging Face hub id, a
    local folder, ``builtin:tiny-llama``, ``builtin:tiny-llama-3.2-bnb-4bit`` or
    ``gguf:<package>/<file>``. Predictions use one shared copy, never with an adapter left in it;
    training loads a copy of its own after that one is released.
    """

    profile: ProfileResource
    device: str = "auto"
    local_files_only: bool = False
    hf_token: str | None = None

    _base: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _base_ref: Any = PrivateAttr(default=None)
    _planned: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if context.instance is not None and context.run is not None:
            choice = self.choice()
            context.instance.add_run_tags(
                context.run.run_id, {"lorasum/profile": self.profile.name, "lorasum/base_model": choice.model}
            )

    def choice(self) -> ModelChoice:
        return resolve(self.profile.get().model, self)

    def spec(self) -> "ModelSpec":
        return base_model_spec(self.choice(), device=self.device, local_files_only=self.local_files_only, token=self.hf_token)

    def base_ref(self) -> BaseModelRef:
        """Which base this is, down to a fingerprint of its weight and tokenizer files."""
        if self._base_ref is None:
            from lorasum_assets.ml.models.loading import model_fingerprint

            spec = self.spec()
            quantization = self.planned_quantization().method
            self._base_ref = BaseModelRef(model=spec.model, revision=spec.revision, quantization=quantization, fingerprint=model_fingerprint(spec))
        return self._base_ref

    def planned_precision(self, mixed_precision: str) -> str:
        """The precision training will run in on this resource's device (``bf16``, ``fp16``, ``fp32``)."""
        from lorasum_assets.ml.models.loading import pick_device
        from lorasum_assets.ml.models.precision import autocast_dtype_on, precision_name

        return precision_name(autocast_dtype_on(pick_device(self.spec()).split(":")[0], mixed_precision))

    def planned_quantization(self):
        """How the base will load (a prequantized checkpoint's own quantization), read from its
        config alone; refuses a setting the checkpoint would override, before anything loads."""
        if self._planned is None:
            from lorasum_assets.ml.models.loading import planned_quantization

            self._planned = planned_quantization(self.spec())
        return self._planned

    def _loading(self, what: str, log: Callable[[str], None] | None, load: Callable[[], Any]) -> Any:
        if log is None:
            return load()
        from lorasum_assets.ml.models.loading import GGUF_PREFIX, loaded_quantization

        spec = self.spec()
        note = " (the GGUF file is converted once, then cached)" if spec.model.startswith(GGUF_PREFIX) else ""
        log(f"loading the {what} of {spec.model}{note}")
        started = time.perf_counter()
        loaded = load()
        held = "" if what == "tokenizer" else f": {loaded_quantization(loaded).describe()}, on {next(loaded.parameters()).device}"
        log(f"loaded the {what} in {time.perf_counter() - started:.1f} s{held}")
        return loaded

    def tokenizer(self, log: Callable[[str], None] | None = None):
        if self._tokenizer is None:
            from lorasum_assets.ml.models.loading import load_tokenizer

            self._tokenizer = self._loading("tokenizer", log, lambda: load_tokenizer(self.spec()))
        return self._tokenizer

    def base_model(self, log: Callable[[str], None] | None = None):
        """The shared base model. Raises if an adapter was left active in it."""
        from lorasum_assets.ml.generation.generate import has_active_adapter
        from lorasum_assets.ml.models.loading import load_model

        if self._base is None:
            from lorasum_assets.ml.models.devices import free_accelerator_memory

            free_accelerator_memory()  # what a training copy or another step left behind in this process
            self._base = self._loading("base model", log, lambda: load_model(self.spec()))
        if has_active_adapter(self._base):
            raise RuntimeError("the cached base model has an active LoRA adapter; base predictions would be contaminated")
        return self._base

    def fresh_model(self, log: Callable[[str], None] | None = None):
        """A new copy of the base model, for training to change as it needs. The shared base is
        dropped first, so one process never holds two copies (it is loaded again when asked for)."""
        from lorasum_assets.ml.models.loading import load_model

        self.release_base(log)
        return self._loading("base model (a copy to train)", log, lambda: load_model(self.spec()))

    def release_base(self, log: Callable[[str], None] | None = None) -> None:
        """Drop the shared base and give its memory back (to CUDA too)."""
        if self._base is None:
            return
        from lorasum_assets.ml.models.devices import free_accelerator_memory

        self._base = None
        free_accelerator_memory()
        if log is not None:
            log("released the shared base model before loading another copy")


LoraModelResource = config_class(
    "LoraModelResource", ModelChoice, _ModelResourceBase.__doc__ or "", base=_ModelResourceBase, exclude=("online_equivalent",)
)
