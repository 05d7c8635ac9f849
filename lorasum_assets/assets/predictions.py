"""base_predictions (no adapter in play) and tuned_predictions (base + adapter)."""

import dagster as dg

from lorasum_assets.assets.data import filtered_split, read_dialogues
from lorasum_assets.assets.training import GPU_POOL, lora_adapter
from lorasum_assets.deployment import gpu_op_tags
from lorasum_assets.ml.generate import GenerationSpec, generate, generate_with_adapter, has_active_adapter
from lorasum_assets.ml.prompts import encode_prompt
from lorasum_assets.profiles import get_profile, with_overrides
from lorasum_assets.resources import LoraModelResource, LorasumStore
from lorasum_assets.store.history import replace_table

PREDICTION_COLUMNS = ("split", "id", "prediction", "new_tokens", "hit_limit", "latency_s", "adapter_id", "run_id")


class GenerationConfig(dg.Config):
    """Greedy by default, as in the notebook. Unset fields take the profile's value."""

    split: str = "test"
    max_new_tokens: int | None = None
    batch_size: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_prompt_tokens: int | None = None


class TunedGenerationConfig(GenerationConfig):
    adapter_id: str | None = None  # default: the adapter registered last


def _prompts(con, tokenizer, config: GenerationConfig, use_chat_template: bool):
    dialogues = read_dialogues(con, "filtered_split", config.split)
    if not dialogues:
        raise ValueError(f"filtered_split has no {config.split!r} rows to generate for")
    prompts = [encode_prompt(tokenizer, d.dialogue, use_chat_template, config.max_prompt_tokens)[0] for d in dialogues]
    return dialogues, prompts


def _spec(config: GenerationConfig) -> GenerationSpec:
    return with_overrides(get_profile().generation, config.model_dump(exclude={"split", "max_prompt_tokens", "adapter_id"}))


def _write(context, store, table, config, dialogues, outputs, adapter_id) -> dg.MaterializeResult:
    rows = [
        (config.split, d.id, g.text, g.new_tokens, g.hit_limit, g.latency_s, adapter_id, context.run_id)
        for d, g in zip(dialogues, outputs, strict=True)
    ]
    with store.connect() as con:
        replace_table(con, table, PREDICTION_COLUMNS, rows)
    seconds = sum(g.latency_s for g in outputs)
    new_tokens = sum(g.new_tokens for g in outputs)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(rows),
            "split": config.split,
            "adapter_id": adapter_id or "none",
            "empty_predictions": sum(1 for g in outputs if not g.text),
            "hit_token_limit": sum(1 for g in outputs if g.hit_limit),
            "mean_new_tokens": round(new_tokens / len(outputs), 1),
            "summaries_per_s": round(len(outputs) / max(seconds, 1e-9), 3),
            "new_tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
            "first_prediction": outputs[0].text,
        }
    )


@dg.asset(
    deps=[filtered_split],
    group_name="evaluation",
    kinds={"pytorch", "duckdb"},
    code_version="1",
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
    description="Greedy summaries from the base model alone: no adapter is loaded or active.",
)
def base_predictions(
    context: dg.AssetExecutionContext, config: GenerationConfig, model: LoraModelResource, store: LorasumStore
) -> dg.MaterializeResult:
    tokenizer = model.tokenizer()
    base = model.base_model()
    if has_active_adapter(base):
        raise RuntimeError("base model has an active adapter")
    with store.connect() as con:
        dialogues, prompts = _prompts(con, tokenizer, config, model.use_chat_template)
    outputs = generate(base, tokenizer, prompts, _spec(config), on_batch=lambda d, n: context.log.info(f"base: {d}/{n}"))
    return _write(context, store, "base_predictions", config, dialogues, outputs, None)


@dg.asset(
    deps=[lora_adapter, filtered_split],
    group_name="evaluation",
    kinds={"pytorch", "duckdb"},
    code_version="1",
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
    description="Greedy summaries from the base model with the LoRA adapter applied.",
)
def tuned_predictions(
    context: dg.AssetExecutionContext, config: TunedGenerationConfig, model: LoraModelResource, store: LorasumStore
) -> dg.MaterializeResult:
    with store.connect() as con:
        if config.adapter_id:
            row = con.execute("SELECT adapter_id, path FROM adapters WHERE adapter_id = ?", [config.adapter_id]).fetchone()
            if row is None:
                raise ValueError(f"no adapter with id {config.adapter_id!r} in the registry")
        else:
            row = con.execute("SELECT adapter_id, path FROM adapters ORDER BY created_at DESC LIMIT 1").fetchone()
            if row is None:
                raise ValueError("no adapter is registered yet; materialize lora_adapter first")
        adapter_id, path = row
        tokenizer = model.tokenizer()
        dialogues, prompts = _prompts(con, tokenizer, config, model.use_chat_template)
    outputs = generate_with_adapter(
        model.base_model(), path, tokenizer, prompts, _spec(config), on_batch=lambda d, n: context.log.info(f"tuned: {d}/{n}")
    )
    return _write(context, store, "tuned_predictions", config, dialogues, outputs, adapter_id)
