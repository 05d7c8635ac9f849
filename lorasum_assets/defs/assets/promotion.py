"""promoted_adapter: the champion/challenger gate at the end of every training run.

The challenger is the run's adapter; the champion is the adapter holding the alias (``production``)
on the same base model and dataset, or the base model itself when none does yet. Both are paired
per example on this run's examples with this run's scorer, and the challenger takes the alias only
when the paired 95% CI on the metric lies wholly above the margin (``ml/evaluation/promotion_rule.py``).
"""

from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg

from lorasum_assets.defs.assets.data import require
from lorasum_assets.defs.assets.predictions import generate_for_adapter
from lorasum_assets.defs.assets.training import GPU_POOL
from lorasum_assets.defs.resources import BertScorerResource, LoraModelResource, LorasumStore, ProfileResource
from lorasum_assets.ml.evaluation.promotion_rule import judge
from lorasum_assets.runtime.deployment import gpu_op_tags
from lorasum_assets.settings.config import config_class, resolve
from lorasum_assets.settings.specs import GenerationSpec, PromotionSpec
from lorasum_assets.settings.versions import code_version
from lorasum_assets.store.aliases import (
    AliasKey,
    ChampionChangedError,
    Evaluation,
    champion_scores,
    current_adapter,
    decision_of_run,
    example_scores,
    find_evaluation,
    record_decision,
    write_champion_examples,
)
from lorasum_assets.store.references import AdapterMismatchError, TableRef, check_adapter_base
from lorasum_assets.store.registry import find_adapter

MAX_DECISION_ATTEMPTS = 5
ScoreChampion = Callable[[str], dict[str, float]]

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
    row = decide_promotion(store.connect, Challenge(context.run.run_id, evaluation, key, rule), score, context.log.info)
    context.log.info(row["reason"])
    with store.connect() as con:
        holder = current_adapter(con, key)
    context.instance.add_run_tags(context.run.run_id, {"lorasum/promoted": "true" if row["moved"] else "false"})
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


@dataclass(frozen=True)
class Challenge:
    """One decision to make: this run's evaluation against the alias's holder."""

    run_id: str
    evaluation: Evaluation
    key: AliasKey
    rule: PromotionSpec



def decide_promotion(connect: Callable, challenge: Challenge, score_champion: ScoreChampion, log: Callable[[str], None]) -> dict:
    """Decide, record and return one promotion row. ``connect()`` opens the history;
    ``score_champion(adapter_id)`` scores an adapter on this run's examples when the history has
    no such scores yet. When another run moves the alias meanwhile, the decision is made again
    against the new holder, never recorded against the old one."""
    evaluation, rule, key = challenge.evaluation, challenge.rule, challenge.key
    with connect() as con:
        earlier = decision_of_run(con, key, challenge.run_id)
        challenger = example_scores(con, evaluation.run_id, "tuned", rule.metric)
        base = example_scores(con, evaluation.run_id, "base", rule.metric)
        champion = current_adapter(con, key)
    if earlier is not None:
        log(f"this run already decided: {earlier['reason']}")
        return earlier
    for _ in range(MAX_DECISION_ATTEMPTS):
        row = _verdict_row(connect, challenge, champion, challenger, base, score_champion, log)
        try:
            with connect() as con:
                return record_decision(con, key, champion, row)
        except ChampionChangedError as exc:
            log(f"{exc}; deciding again against {exc.current or 'the base model'}")
            champion = exc.current
    raise RuntimeError(f"{key.describe()} kept moving while this run decided ({MAX_DECISION_ATTEMPTS} attempts)")


def _verdict_row(connect, challenge: Challenge, champion: str | None, challenger: dict, base: dict, score_champion, log) -> dict:
    evaluation, rule = challenge.evaluation, challenge.rule
    fields = {"adapter_id": evaluation.adapter_id, "run_id": challenge.run_id, "metric": rule.metric, "margin": rule.margin}
    if champion == evaluation.adapter_id:
        return {**fields, "moved": False, "decision": "kept", "compared_with": champion,
                "reason": f"kept {champion}: it already holds {rule.alias}"}
    against, label, note = base, "the base model", ""
    if champion is not None:
        with connect() as con:
            scores = champion_scores(con, champion, evaluation, rule.metric)
        if scores is None:
            log(f"champion {champion} was never scored on these {len(challenger)} examples with this scorer; scoring it first")
            try:
                scores = score_champion(champion)
            except AdapterMismatchError as exc:
                note = f" ({exc}: compared with the base model instead)"
        if scores is not None:
            against, label = scores, champion
    verdict = judge(challenger, against, rule, evaluation.adapter_id, label)
    return {
        **fields, "moved": verdict.promote, "decision": "promoted" if verdict.promote else "kept",
        "delta": verdict.change.mean, "ci_low": verdict.change.low, "ci_high": verdict.change.high,
        "n_examples": verdict.n_examples, "compared_with": "base" if against is base else champion, "reason": verdict.reason + note,
    }
