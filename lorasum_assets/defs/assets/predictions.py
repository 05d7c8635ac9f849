"""base_predictions (no adapter in play) and tuned_predictions (base + adapter)."""

from dataclasses import asdict, dataclass

import dagster as dg
from pydantic import Field

from lorasum_assets.defs.assets.data import dataset_of, read_dialogues, require
from lorasum_assets.defs.assets.training import GPU_POOL
from lorasum_assets.defs.resources import LoraModelResource, LorasumStore, ProfileResource
from lorasum_assets.defs.resources.lineage import lineage_run_ids
from lorasum_assets.defs.resources.preflight import RunPreflightResource
from lorasum_assets.ml.data.prompts import encode_prompts, trained_prompt_format
from lorasum_assets.ml.models.adapter_files import verify_adapter_files
from lorasum_assets.ml.progress import Progress
from lorasum_assets.runtime.deployment import gpu_op_tags
from lorasum_assets.settings.config import config_class, resolve
from lorasum_assets.settings.specs import PRODUCTION_ALIAS, GenerationSpec, ModelChoice
from lorasum_assets.settings.versions import code_version
from lorasum_assets.store.aliases import AliasKey
from lorasum_assets.store.references import AdapterRef, TableRef, version_of
from lorasum_assets.store.registry import AUTO_ADAPTER, choose_adapter, production_adapter
from lorasum_assets.store.writes import write_materialization

PREDICTION_COLUMNS = ("split", "id", "prediction", "new_tokens", "hit_limit", "latency_s", "adapter_id")

GenerationConfig = config_class("GenerationConfig", GenerationSpec, "How the summaries are generated: greedy by default.")
TunedGenerationConfig = config_class(
    "TunedGenerationConfig",
    GenerationSpec,
    "Which adapter, and how the summaries are generated: greedy by default.",
    adapter_id=(
        str | None,
        Field(
            # A default with a value, so that the Launchpad shows the field ready to edit.
            default=AUTO_ADAPTER,
            description="The registered adapter to evaluate, by id (`lorasum adapters` lists them). auto: the adapter "
            "trained in this run, else the production adapter of this base model and dataset, else the newest adapter "
            "trained on this base model.",
        ),
    ),
)


def _progress(context: dg.AssetExecutionContext, label: str, total: int):
    """Callbacks for generate(): a line after each batch (done/total, rate, time left), and one
    every ~10 s while a batch decodes."""
    progress = Progress(total, "summaries", start_at=0)
    context.log.info(f"{label}: generating {total} summaries")
    return (lambda done, _: context.log.info(f"{label}: {progress.line(done)}")), (lambda line: context.log.info(f"{label}: {line}"))


def _prompts(store, tokenizer, upstream: TableRef, spec: GenerationSpec, choice: ModelChoice, budget: int):
    with store.connect() as con:
        dialogues = read_dialogues(con, upstream, spec.split)
    if not dialogues:
        raise ValueError(f"filtered_split has no {spec.split!r} rows to generate for")
    encoded = encode_prompts(tokenizer, [d.dialogue for d in dialogues], use_chat_template=choice.use_chat_template,
                             boundary=choice.prompt_boundary, max_prompt_tokens=budget)
    return dialogues, [ids for ids, _ in encoded], sum(1 for _, cut in encoded if cut)


def what_ran(base, tokenizer) -> dict:
    """How the base model generating was held, read from the model itself, and the ids it stopped on."""
    from lorasum_assets.ml.generation.generate import stop_token_ids
    from lorasum_assets.ml.models.loading import loaded_quantization

    held = loaded_quantization(base)
    return {"base_quantization": held.method, "base_compute_dtype": held.compute_dtype, "stop_ids": stop_token_ids(base, tokenizer)}


def empty_summaries(empty: list[str], rows: int, what: str = "summaries") -> str:
    """How many summaries are empty (blank once trimmed, as the history's query counts them),
    naming the first ten."""
    return f"{len(empty)} of {rows} {what} are empty: {', '.join(empty[:10])}" + (" …" if len(empty) > 10 else "")


def _write(context, store, *, asset: str, spec: GenerationSpec, generated: "PredictionRun", adapter_id: str | None,
           version_parts: tuple) -> dg.Output[TableRef]:
    """The predictions as one materialization of ``asset``, and the metadata the UI shows for it."""
    from lorasum_assets.ml.models.devices import take_peak_gpu_memory

    dialogues, outputs = generated.dialogues, generated.outputs
    rows = [
        (spec.split, d.id, g.text, g.new_tokens, g.hit_limit, g.latency_s, adapter_id)
        for d, g in zip(dialogues, outputs, strict=True)
    ]
    engine = outputs.engine
    content_hash = version_of(*[(r[1], r[2]) for r in rows])
    # which engine generated, in which dtype, is part of what these predictions are
    version = version_of(content_hash, *version_parts, engine.engine, engine.dtype)
    with store.connect() as con:
        write_materialization(con, asset, context.run.run_id, {asset: (PREDICTION_COLUMNS, rows)}, content_hash, version)
    empty = [d.id for d, g in zip(dialogues, outputs, strict=True) if not g.text.strip()]
    if empty:
        context.log.warning(f"{empty_summaries(empty, len(outputs))}; the check summaries_not_empty names them too")
    seconds = sum(g.latency_s for g in outputs)
    new_tokens = sum(g.new_tokens for g in outputs)
    details = {"split": spec.split, "adapter_id": adapter_id, "generation": asdict(spec), "engine": engine.as_dict()}
    ref = TableRef(asset=asset, run_id=context.run.run_id, rows=len(rows), content_hash=content_hash, data_version=version, details=details)
    return dg.Output(
        ref,
        metadata={
            "dagster/row_count": len(rows),
            "split": spec.split,
            "adapter_id": adapter_id or "none",
            "empty_predictions": sum(1 for g in outputs if not g.text),
            "hit_token_limit": sum(1 for g in outputs if g.hit_limit),
            "mean_new_tokens": round(new_tokens / len(outputs), 1),
            "summaries_per_s": round(len(outputs) / max(seconds, 1e-9), 3),
            "new_tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
            "first_prediction": outputs[0].text,
            "max_prompt_tokens": generated.budget,
            "prompts_truncated": generated.truncated,
            "engine": engine.engine,
            "engine_dtype": engine.dtype,
            **generated.ran,
            "device": engine.device,
            **take_peak_gpu_memory(),
            "versions": f"torch {engine.torch}, transformers {engine.transformers}",
        },
        data_version=dg.DataVersion(version),
    )


@dg.asset(
    group_name="evaluation",
    kinds={"pytorch", "duckdb"},
    code_version=code_version(__name__),
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
    description="Greedy summaries from the base model alone: no adapter is loaded or active.",
)
def base_predictions(
    context: dg.AssetExecutionContext,
    config: GenerationConfig,
    profile: ProfileResource,
    model: LoraModelResource,
    store: LorasumStore,
    preflight: RunPreflightResource,
    filtered_split: TableRef | None,
) -> dg.Output[TableRef]:
    from lorasum_assets.ml.generation.generate import generate, has_active_adapter, prompt_budget

    spec: GenerationSpec = resolve(profile.get().generation, config)
    upstream = require(filtered_split, "filtered_split")
    tokenizer = model.tokenizer(context.log.info)
    base = model.base_model(context.log.info)
    if has_active_adapter(base):
        raise RuntimeError("base model has an active adapter")
    budget = prompt_budget(spec, base)
    dialogues, prompts, truncated = _prompts(store, tokenizer, upstream, spec, model.choice(), budget)
    outputs = generate(base, tokenizer, prompts, spec, *_progress(context, "base_predictions", len(prompts)))
    generated = PredictionRun(dialogues=dialogues, outputs=outputs, budget=budget, truncated=truncated, ran=what_ran(base, tokenizer))
    return _write(context, store, asset="base_predictions", spec=spec, generated=generated, adapter_id=None,
                  version_parts=(model.base_ref(), asdict(spec), upstream.data_version))


@dg.asset(
    group_name="evaluation",
    kinds={"pytorch", "duckdb"},
    code_version=code_version(__name__),
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
    description="Greedy summaries from the base model with the LoRA adapter applied.",
)
def tuned_predictions(
    context: dg.AssetExecutionContext,
    config: TunedGenerationConfig,
    profile: ProfileResource,
    model: LoraModelResource,
    store: LorasumStore,
    preflight: RunPreflightResource,
    lora_adapter: AdapterRef | None,
    filtered_split: TableRef | None,
) -> dg.Output[TableRef]:
    spec: GenerationSpec = resolve(profile.get().generation, config)
    upstream = require(filtered_split, "filtered_split")
    in_lineage = lora_adapter if lora_adapter is not None and lora_adapter.run_id in lineage_run_ids(context.instance, context.run.run_id) else None
    with store.connect() as con:
        production = production_adapter(con, AliasKey(PRODUCTION_ALIAS, model.choice().model, dataset_of(upstream)))
        adapter = choose_adapter(con, model.base_ref(), config.adapter_id, in_lineage, production)
    context.log.info(f"applying adapter {adapter.adapter_id} (trained in run {adapter.run_id}) to {adapter.base.describe()}")
    context.instance.add_run_tags(context.run.run_id, {"lorasum/adapter_id": adapter.adapter_id})
    generated = generate_for_adapter(context, model, store, adapter, upstream, spec, "tuned_predictions")
    return _write(context, store, asset="tuned_predictions", spec=spec, generated=generated, adapter_id=adapter.adapter_id,
                  version_parts=(adapter.data_version, asdict(spec), upstream.data_version))


@dataclass(frozen=True)
class PredictionRun:
    """One generation run's summaries, with the prompt budget, how many prompts were cut and what ran."""

    dialogues: list
    outputs: list
    budget: int
    truncated: int
    ran: dict


def generate_for_adapter(context, model, store, adapter: AdapterRef, upstream: TableRef, spec: GenerationSpec, label: str) -> PredictionRun:
    """Summaries of ``upstream``'s ``spec.split`` dialogues from the base with ``adapter`` applied,
    after checking that the adapter's files and prompt format are the ones it was registered with."""
    from lorasum_assets.ml.generation.generate import generate_with_adapter, prompt_budget

    _, trained_with = trained_prompt_format(adapter.training)
    if trained_with != model.choice().prompt_boundary:
        raise ValueError(
            f"adapter {adapter.adapter_id} was trained with the {trained_with!r} prompt boundary; "
            f"evaluate it with resources.model.config.prompt_boundary: {trained_with}"
        )
    verify_adapter_files(adapter.adapter_id, adapter.path, adapter.sha256)
    tokenizer = model.tokenizer(context.log.info)
    base = model.base_model(context.log.info)
    budget = prompt_budget(spec, base)
    dialogues, prompts, truncated = _prompts(store, tokenizer, upstream, spec, model.choice(), budget)
    outputs = generate_with_adapter(base, adapter.path, tokenizer, prompts, spec, *_progress(context, label, len(prompts)))
    return PredictionRun(dialogues=dialogues, outputs=outputs, budget=budget, truncated=truncated, ran=what_ran(base, tokenizer))
