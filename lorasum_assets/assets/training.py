"""lora_adapter: LoRA/QLoRA training, registered in DuckDB with its sha256 and losses."""

import hashlib
import json
import shutil
from dataclasses import asdict
from datetime import UTC, datetime

import dagster as dg

from lorasum_assets.assets.data import tokenized_dataset
from lorasum_assets.assets.plots import line_plot
from lorasum_assets.home import home_subdir, lorasum_home
from lorasum_assets.ml.train import TrainExample, TrainSpec, prepare_peft_model, save_adapter, sha256_file, train_lora
from lorasum_assets.profiles import get_profile, with_overrides
from lorasum_assets.resources import LoraModelResource, LorasumStore
from lorasum_assets.store.history import record_training_epoch, record_training_step, register_adapter

GPU_POOL = "lorasum_gpu"


class TrainingConfig(dg.Config):
    """Every training knob; unset fields take the profile's value (the notebook's recipe for
    ``llama-3.2-3b-qlora``)."""

    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    target_modules: list[str] | None = None
    learning_rate: float | None = None
    lr_scheduler: str | None = None
    warmup_ratio: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    epochs: int | None = None
    max_steps: int | None = None
    max_grad_norm: float | None = None
    gradient_checkpointing: bool | None = None
    mixed_precision: str | None = None
    completion_only_logits: bool | None = None
    packing: bool | None = None
    group_by_length: bool | None = None
    logging_steps: int | None = None
    checkpoint_steps: int | None = None
    seed: int | None = None


def _read_examples(con, split: str) -> tuple[list[TrainExample], str]:
    rows = con.execute(
        "SELECT id, input_ids, labels FROM tokenized_dataset WHERE split = ? ORDER BY id", [split]
    ).fetchall()
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row).encode())
    return [TrainExample(list(ids), list(labels)) for _, ids, labels in rows], digest.hexdigest()


@dg.asset(
    deps=[tokenized_dataset],
    group_name="training",
    kinds={"pytorch", "duckdb"},
    code_version="1",
    pool=GPU_POOL,
    description="A LoRA adapter folder (adapter_config.json, adapter_model.safetensors, tokenizer), registered in DuckDB.",
)
def lora_adapter(
    context: dg.AssetExecutionContext, config: TrainingConfig, model: LoraModelResource, store: LorasumStore
) -> dg.MaterializeResult:
    profile = get_profile()
    spec: TrainSpec = with_overrides(profile.training, config.model_dump())
    with store.connect() as con:
        train_examples, train_hash = _read_examples(con, "train")
        val_examples, val_hash = _read_examples(con, "validation")
    data_hash = hashlib.sha256((train_hash + val_hash).encode()).hexdigest()
    train_key = spec.fingerprint(data_hash, f"{model.model}@{model.revision}:{model.quantization}")
    checkpoint_dir = home_subdir("checkpoints", train_key)
    run_id = context.run_id

    def on_step(log) -> None:
        context.log.info(
            f"step {log.step}: loss {log.loss:.4f}, lr {log.learning_rate:.2e}, grad_norm {log.grad_norm:.3f}, epoch {log.epoch:.2f}"
        )
        with store.connect() as con:
            record_training_step(con, train_key, run_id, log)

    def on_epoch(epoch: int, val_loss: float | None) -> None:
        context.log.info(f"epoch {epoch}: validation loss {val_loss}")
        with store.connect() as con:
            record_training_epoch(con, train_key, run_id, epoch, val_loss)

    tokenizer = model.tokenizer()
    peft_model = prepare_peft_model(model.fresh_model(), spec)
    result = train_lora(
        peft_model,
        train_examples,
        val_examples,
        spec,
        pad_id=tokenizer.pad_token_id,
        checkpoint_dir=checkpoint_dir,
        on_step=on_step,
        on_epoch=on_epoch,
    )
    if result.resumed_from_step:
        context.log.info(f"resumed from checkpoint at step {result.resumed_from_step} of {result.total_steps}")

    created_at = datetime.now(UTC)
    adapter_id = f"{profile.name}-{created_at:%Y%m%d-%H%M%S}-{run_id[:8]}"
    target = lorasum_home() / "adapters" / adapter_id
    save_adapter(peft_model, tokenizer, target)
    weights_sha = sha256_file(target / "adapter_model.safetensors")
    trainable_pct = 100.0 * result.trainable_params / max(result.total_params, 1)
    with store.connect() as con:
        register_adapter(
            con,
            {
                "adapter_id": adapter_id,
                "run_id": run_id,
                "train_key": train_key,
                "base_model": model.model,
                "base_revision": model.revision,
                "profile": profile.name,
                "config": {**asdict(spec), "quantization": model.quantization},
                "trainable_params": result.trainable_params,
                "total_params": result.total_params,
                "trainable_percent": trainable_pct,
                "final_train_loss": result.final_train_loss,
                "final_val_loss": result.final_val_loss,
                "dataset_hash": data_hash,
                "sha256": weights_sha,
                "path": str(target),
                "created_at": created_at.replace(tzinfo=None),
            },
        )
        step_rows = con.execute(
            "SELECT step, loss FROM training_steps WHERE train_key = ? ORDER BY step", [train_key]
        ).fetchall()
    shutil.rmtree(checkpoint_dir, ignore_errors=True)

    steps = [s for s, _ in step_rows]
    losses = [loss for _, loss in step_rows]
    first_loss = losses[0] if losses else None
    metadata = {
        "adapter_id": adapter_id,
        "path": dg.MetadataValue.path(str(target)),
        "sha256": weights_sha,
        "train_key": train_key,
        "base_model": model.model,
        "quantization": model.quantization,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "trainable_percent": round(trainable_pct, 4),
        "optimizer_steps": result.total_steps,
        "resumed_from_step": result.resumed_from_step,
        "first_train_loss": first_loss,
        "final_train_loss": result.final_train_loss,
        "val_losses": [v for v in result.val_losses if v is not None],
        "padding_efficiency": round(result.real_tokens / max(result.padded_tokens, 1), 4),
        "train_seconds": round(result.seconds, 2),
        "config": dg.MetadataValue.json(asdict(spec)),
    }
    if steps:
        metadata["loss_curve"] = line_plot({"train loss": (steps, losses)}, "Training loss", "optimizer step", "loss")
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(weights_sha[:16]))
