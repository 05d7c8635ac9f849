"""promoted_adapter: the champion/challenger gate at the end of every training run.

The challenger is the run's adapter; the champion is the adapter holding the alias (``production``)
on the same base model and dataset, or the base model itself when none does yet. Both are paired
per example on this run's examples with this run's scorer, and the challenger takes the alias only
when the paired 95% CI on the metric lies wholly above the margin (``ml/evaluation/promotion_rule.py``).
"""

import dagster as dg

from lorasum_assets.defs.assets.data import require
from lorasum_assets.defs.assets.predictions import generate_for_adapter
from lorasum_assets.defs.assets.training import GPU_POOL
from lorasum_assets.defs.resources import BertScorerResource, LoraModelResource, LorasumStore, ProfileResource
from lorasum_assets.runtime.deployment import gpu_op_tags
from lorasum_assets.settings.config import config_class, resolve
from lorasum_assets.settings.specs import GenerationSpec, PromotionSpec
from lorasum_assets.settings.versions import code_version
from lorasum_assets.store.promotions import (
    AliasKey,
    Challenge,
    Evaluation,
    ScoreChampion,
    current_adapter,
    decide_promotion,
    find_evaluation,
    write_champion_examples,
)
from lorasum_assets.store.references import TableRef, check_adapter_base
from lorasum_assets.store.registry import find_adapter

PromotionConfig = config_class(
    "PromotionConfig", PromotionSpec, "When the run's adapter takes the alias from the adapter holding it."
)


def _champion_scorer(context, model, scorer, store, evaluation: Evaluation, dialogues: TableRef, generation: dict, metric: str) -> ScoreChampion:
    """Generates the champion's summaries of this run's examples with this run's settings, scores
    them with this run's scorer and keeps them in the history (``champion_examples``)."""

    def score(adapter_id: str) -> dict[str, float]:
        from lorasum_assets.ml.evaluation.scoring import score_examples

        with store.connect() as con:
            adapter = find_adapter(con, adapter_id)
        if adapter is None:
            raise RuntimeError(f"the champion {adapter_id} is not in the adapter registry")
        check_adapter_base(adapter.adapter_id, adapter.base, model.base_ref())
        scoring = scorer.scorer()
        if scoring.hash != evaluation.scorer_hash:
            raise RuntimeError(f"this run's scorer ({scoring.hash}) is not the one its report used ({evaluation.scorer_hash})")
        generated = generate_for_adapter(context, model, store, adapter, dialogues, GenerationSpec(**generation), "champion")
        scores = score_examples(scoring, [g.text for g in generated.outputs], [d.references for d in generated.dialogues])
        rows = [
            dict(run_id=evaluation.run_id, adapter_id=adapter_id, id=d.id, prediction=g.text, new_tokens=g.new_tokens,
                 hit_limit=g.hit_limit, **{m: values[i] for m, values in scores.items()}, scorer_hash=scoring.hash)
            for i, (d, g) in enumerate(zip(generated.dialogues, generated.outputs, strict=True))
        ]
        with store.connect() as con:
            write_champion_examples(con, evaluation.run_id, adapter_id, rows)
        return {row["id"]: row[metric] for row in rows}

    return score


@dg.asset(
    group_name="evaluation",
    kinds={"python", "duckdb"},
    code_version=code_version(__name__),
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
    description=(
        "Champion/challenger gate: the run's adapter takes the production alias of its base model and dataset only when "
        "its paired 95% CI over the holder (or, for the first one, over the base) lies above the margin."
    ),
)
def promoted_adapter(
    context: dg.AssetExecutionContext,
    config: PromotionConfig,
    profile: ProfileResource,
    model: LoraModelResource,
    scorer: BertScorerResource,
    store: LorasumStore,
    bertscore_report: TableRef | None,
    filtered_split: TableRef | None,
) -> dg.MaterializeResult:
    rule: PromotionSpec = resolve(profile.get().promotion, config)
    report = require(bertscore_report, "bertscore_report")
    dialogues = require(filtered_split, "filtered_split")
    with store.connect() as con:
        evaluation = find_evaluation(con, report.run_id)
    if evaluation is None:
        raise ValueError(f"the history has no evaluation of run {report.run_id}; materialize bertscore_report first")
    key = AliasKey(rule.alias, evaluation.base_model, evaluation.dataset or "unknown")
    score = _champion_scorer(context, model, scorer, store, evaluation, dialogues, report.details.get("generation") or {}, rule.metric)
    row = decide_promotion(store.connect, Challenge(context.run_id, evaluation, key, rule), score, context.log.info)
    context.log.info(row["reason"])
    with store.connect() as con:
        holder = current_adapter(con, key)
    context.instance.add_run_tags(context.run_id, {"lorasum/promoted": "true" if row["moved"] else "false"})
    # Key and value rows of the UI's metadata table, in reading order: the decision stacked this
    # way fits a 1280 px window, where one table of six columns did not. The reason carries the
    # figures (the change with its paired CI, and the margin), so they appear once.
    return dg.MaterializeResult(
        metadata={
            "decision": row["decision"],
            "reason": row["reason"],
            "challenger": row["adapter_id"],
            "compared_with": row["compared_with"] or "none",
            f"{rule.alias}_adapter": holder or "none",
            "previous_adapter": row["previous_adapter_id"] or "none",
        },
        data_version=dg.DataVersion(f"{row['promotion_id']}"),
    )
