"""One training, start to end: load the base, wrap it in LoRA, train, save the adapter. The asset's
in-process path and the accelerate worker both call ``train_adapter``, and both get its one record."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

from lorasum_assets.ml.models.adapter_files import save_adapter, sha256_file
from lorasum_assets.ml.models.devices import free_accelerator_memory
from lorasum_assets.ml.models.loading import loaded_quantization
from lorasum_assets.ml.training import loop
from lorasum_assets.ml.training.lora import prepare_peft_model
from lorasum_assets.ml.training.records import StepLog, TrainingRequest, TrainResult


@dataclass(frozen=True)
class TrainingHooks:
    """Where a training reports: each optimizer step, each epoch's validation loss."""

    on_step: Callable[[StepLog], None] | None = None
    on_epoch: Callable[[int, float | None], None] | None = None


LoadBase = Callable[[], tuple[Any, Any]]  # () -> (tokenizer, a base model of the caller's own to change)


def train_adapter(request: TrainingRequest, *, load: LoadBase, hooks: TrainingHooks = TrainingHooks(), accelerator=None,
                  loading: AbstractContextManager | None = None) -> TrainResult:
    """Load, prepare, train and save (the last on the main process only); returns the loop's record
    with how the base was held and the sha256 of the weights saved. ``loading`` wraps the load (an
    accelerator's ``main_process_first``: the first process builds or converts cached weights alone)."""
    with loading or nullcontext():
        tokenizer, base = load()
    quantization = asdict(loaded_quantization(base))
    peft_model = prepare_peft_model(base, request.spec)
    result = loop.train_lora(
        peft_model, request.train_examples, request.val_examples, request.spec, pad_id=tokenizer.pad_token_id,
        checkpoint_dir=request.checkpoint_dir, on_step=hooks.on_step, on_epoch=hooks.on_epoch, accelerator=accelerator,
    )
    result.quantization = quantization
    result.launcher = launcher_facts(accelerator, result)
    if accelerator is None or accelerator.is_main_process:
        saved = save_adapter(peft_model, tokenizer, request.adapter_dir)
        result.adapter_sha256 = sha256_file(saved / "adapter_model.safetensors")
    del peft_model, base
    free_accelerator_memory()  # the trained copy goes before generation loads the shared base
    return result



def launcher_facts(accelerator, result: TrainResult) -> dict:
    if accelerator is None:
        return {"launcher": "in_process", "world_size": 1}
    return {"launcher": "accelerate", "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type.value), "backend": str(accelerator.state.backend or "none"),
            "real_tokens_per_second": round(result.real_tokens / max(result.seconds, 1e-9), 2)}
