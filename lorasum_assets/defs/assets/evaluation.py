"""bertscore_report: BERTScore and ROUGE for base vs tuned, appended to the evaluation history."""

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import dagster as dg

from lorasum_assets import __version__
from lorasum_assets.defs.assets.data import dataset_of, read_dialogues, require
from lorasum_assets.defs.assets.plots import histogram, markdown_table
from lorasum_assets.defs.assets.plots import table as table_value
from lorasum_assets.defs.resources import BertScorerResource, LoraModelResource, LorasumStore, ProfileResource
from lorasum_assets.ml.evaluation.stats import percent_difference
from lorasum_assets.runtime.text import text_table
from lorasum_assets.settings.config import config_class, resolve
from lorasum_assets.settings.specs import EVAL_METRICS as METRICS
from lorasum_assets.settings.specs import ReportSpec
from lorasum_assets.settings.versions import code_version
from lorasum_assets.store.queries import adapter_sha256, evaluated_set_hash, prediction_rows
from lorasum_assets.store.references import TableRef, version_of
from lorasum_assets.store.writes import write_evaluation

ReportConfig = config_class("ReportConfig", ReportSpec, "Bootstrap settings of the confidence intervals.")


# The run log's table, as plain aligned text narrow enough (62 characters) not to wrap in the run
# log's message column of a 1280 px window: the means, and the change with its paired 95% CI,
# marked ▲/▼ when that CI excludes 0. The metric tables in the metadata add each side's CI.
REPORT_HEADER = ("metric", "base", "tuned", "change [95% CI]", "% diff")
# Names as papers print them; each names its table in the report's metadata.
METRIC_LABELS = {
    "bertscore_precision": "BERTScore P", "bertscore_recall": "BERTScore R", "bertscore_f1": "BERTScore F1",
    "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum",
}


def _with_ci(score: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{score['value']:{sign}.3f} [{score['ci_low']:{sign}.3f}, {score['ci_high']:{sign}.3f}]"


def significance_mark(delta: dict) -> str:
    """▲ or ▼ when the paired CI lies wholly above or below 0, else –."""
    if delta["ci_low"] > 0:
        return "▲"
    if delta["ci_high"] < 0:
        return "▼"
    return "–"


def change_with_mark(delta: dict) -> str:
    """The change with its paired CI, and ▲/▼ when the CI lies wholly above or below 0."""
    mark = significance_mark(delta)
    return _with_ci(delta, signed=True) + ("" if mark == "–" else f" {mark}")


def _sides(report, metric: str) -> tuple[dict, dict, dict]:
    """Base, tuned and the paired change (tuned − base) of one metric, each with its CI."""
    from lorasum_assets.ml.evaluation.scoring import metric_value

    return tuple(metric_value(report, side, metric) for side in ("base", "tuned", "delta"))


def report_rows(report) -> list[tuple]:
    """The notebook's two tables (scores, and the tuned-vs-base percentage difference) as one: the
    run log's table."""
    rows = []
    for metric in METRICS:
        base, tuned, delta = _sides(report, metric)
        rows.append((METRIC_LABELS[metric], f"{base['value']:.3f}", f"{tuned['value']:.3f}", change_with_mark(delta),
                     percent_difference(base["value"], tuned["value"], digits=1)))
    return rows


@dataclass(frozen=True)
class ScoredInputs:
    """What one evaluation scores: the split's dialogues and both sides' predictions, by id."""

    split: str
    dialogues: list
    base: dict[str, tuple]
    tuned: dict[str, tuple]
    dataset_hash: str
    adapter_id: str
    adapter_sha256: str | None
    generation: dict | None


def _read_inputs(store, base_ref: TableRef, tuned_ref: TableRef, dialogues_ref: TableRef) -> ScoredInputs:
    split = base_ref.details["split"]
    if tuned_ref.details["split"] != split:
        raise ValueError(f"base predictions are of the {split!r} split but tuned predictions of {tuned_ref.details['split']!r}")
    adapter_id = tuned_ref.details["adapter_id"]
    with store.connect() as con:
        inputs = ScoredInputs(
            split=split,
            dialogues=read_dialogues(con, dialogues_ref, split),
            base=prediction_rows(con, base_ref.asset, base_ref.run_id),
            tuned=prediction_rows(con, tuned_ref.asset, tuned_ref.run_id),
            dataset_hash=evaluated_set_hash(con, dialogues_ref.run_id, split),
            adapter_id=adapter_id,
            adapter_sha256=adapter_sha256(con, adapter_id),
            generation=tuned_ref.details.get("generation"),
        )
    missing = [d.id for d in inputs.dialogues if d.id not in inputs.base or d.id not in inputs.tuned]
    if missing:
        raise ValueError(f"{len(missing)} {split} dialogues lack a base or tuned prediction, e.g. {missing[:5]}")
    return inputs


def _score(context, scorer, inputs: ScoredInputs, spec: ReportSpec, model):
    """BERTScore and ROUGE of both models' predictions; the shared base is released first, so that
    the scoring model (roberta-large for the recipe) never loads beside it."""
    from lorasum_assets.ml.evaluation.scoring import score_predictions

    model.release_base(context.log.info)
    dialogues = inputs.dialogues
    context.log.info(f"scoring {len(dialogues)} base and {len(dialogues)} tuned summaries with {scorer.spec().model} BERTScore and ROUGE")
    started = time.perf_counter()
    scoring = scorer.scorer()
    predictions = {"base": [inputs.base[d.id][0] for d in dialogues], "tuned": [inputs.tuned[d.id][0] for d in dialogues]}
    report = score_predictions(scoring, predictions, [d.references for d in dialogues], spec.bootstrap_resamples, spec.seed)
    context.log.info(f"scored in {time.perf_counter() - started:.1f} s")
    return scoring, report


def _example_rows(run_id: str, inputs: ScoredInputs, report, scorer_hash: str) -> list[dict]:
    rows = []
    for model_name, source in (("base", inputs.base), ("tuned", inputs.tuned)):
        scores = report.per_example[model_name]
        for i, d in enumerate(inputs.dialogues):
            prediction, new_tokens, hit_limit, _ = source[d.id]
            rows.append(
                dict(
                    run_id=run_id, model=model_name, id=d.id, prediction=prediction, new_tokens=new_tokens,
                    hit_limit=hit_limit, **{m: scores[m][i] for m in METRICS}, scorer_hash=scorer_hash,
                )
            )
    return rows


def _write_history(context, store, *, spec: ReportSpec, profile_name: str, base_model: str, inputs: ScoredInputs,
                   refs: tuple[TableRef, TableRef, TableRef], scoring, report) -> None:
    """The run's rows in eval_runs, eval_metrics, eval_examples and eval_scope, in one transaction."""
    base_ref, tuned_ref, dialogues_ref = refs
    run_id = context.run.run_id
    run = context.instance.get_run_by_id(run_id)
    lorasum_tags = {k: v for k, v in (run.tags if run else {}).items() if k.startswith("lorasum/")}
    evaluation = dict(
        run_id=run_id,
        created_at=datetime.now(UTC).replace(tzinfo=None),
        profile=profile_name,
        params={"split": inputs.split, "bootstrap_resamples": spec.bootstrap_resamples, "seed": spec.seed,
                "base_predictions_run": base_ref.run_id, "tuned_predictions_run": tuned_ref.run_id, "tags": lorasum_tags,
                "engines": {"base": (base_ref.details or {}).get("engine"), "tuned": (tuned_ref.details or {}).get("engine")}},
        code_version=__version__,
        base_model=base_model,
        dataset_hash=inputs.dataset_hash,
        split=inputs.split,
        n_examples=len(inputs.dialogues),
        adapter_id=inputs.adapter_id,
        adapter_sha256=inputs.adapter_sha256,
        scorer_hash=scoring.hash,
    )
    scope = dict(dataset=dataset_of(dialogues_ref), generation_hash=version_of(inputs.generation) if inputs.generation else None)
    metrics = [dict(run_id=run_id, **m, scorer_hash=scoring.hash) for m in report.metrics]
    with store.connect() as con:
        write_evaluation(con, evaluation, metrics, _example_rows(run_id, inputs, report, scoring.hash), scope=scope)


# Each metric's table has one value column, so that it fits the metadata's value column of the
# Dagster UI (about 320 px in a 1280 px window with the right-hand panel open) and each CI stays on
# one line. The rows' meaning is in the table's schema ("Show schema").
METRIC_TABLE_COLUMNS = {
    "": "base and tuned: the model's mean over the examples; change: tuned − base per example, averaged; "
        "% diff: the change in percent of base",
    "mean [95% CI]": "mean [95% bootstrap CI]; for change the CI is paired, with ▲ or ▼ when it lies wholly above or below 0",
}


def metric_table_rows(report, metric: str) -> list[tuple[str, str]]:
    base, tuned, delta = _sides(report, metric)
    return [("base", _with_ci(base)), ("tuned", _with_ci(tuned)), ("change", change_with_mark(delta)),
            ("% diff", percent_difference(base["value"], tuned["value"], digits=1))]


def _report_metadata(inputs: ScoredInputs, report, scorer_hash: str) -> dict:
    """Each figure once: a table per metric, the F1 change per dialogue as a plot, five examples,
    and the F1 means a person charts across runs (rounded as in the tables)."""

    dialogues = inputs.dialogues
    f1_base, f1_tuned = report.per_example["base"]["bertscore_f1"], report.per_example["tuned"]["bertscore_f1"]
    deltas = [t - b for t, b in zip(f1_tuned, f1_base)]
    side_by_side = markdown_table(
        ["id", "dialogue (start)", "reference", "base", "tuned", "F1 change"],
        [(d.id, d.dialogue[:160] + "…", d.references[0], inputs.base[d.id][0], inputs.tuned[d.id][0], f"{deltas[i]:+.3f}")
         for i, d in list(enumerate(dialogues))[:5]],
    )
    metadata: dict = {"dagster/row_count": len(report.metrics)}
    for metric in METRICS:
        metadata[METRIC_LABELS[metric]] = table_value(tuple(METRIC_TABLE_COLUMNS), metric_table_rows(report, metric),
                                                      descriptions=METRIC_TABLE_COLUMNS)
    # Keys with spaces: the UI's key column wraps them, where a long snake_case key widens it.
    metadata["F1 change per dialogue"] = histogram(
        deltas, "BERTScore F1 change per dialogue", "BERTScore F1, tuned − base", "dialogues")
    metadata["examples"] = dg.MetadataValue.md(side_by_side)
    for name, score in zip(("base", "tuned", "change"), _sides(report, "bertscore_f1")):
        metadata[f"BERTScore F1 {name}"] = round(score["value"], 3)
    metadata.update({"n_examples": len(dialogues), "split": inputs.split, "adapter_id": inputs.adapter_id, "scorer": scorer_hash})
    return metadata


@dg.asset(
    group_name="evaluation",
    kinds={"python", "duckdb"},
    code_version=code_version(__name__),
    description=(
        "BERTScore P/R/F1 and ROUGE of base and tuned on the same examples, one history row set per run. Each metric's "
        "table gives base and tuned as mean [95% bootstrap CI] and their change with its paired CI, marked ▲/▼ when "
        "that CI excludes 0."
    ),
)
def bertscore_report(
    context: dg.AssetExecutionContext,
    config: ReportConfig,
    profile: ProfileResource,
    scorer: BertScorerResource,
    model: LoraModelResource,
    store: LorasumStore,
    base_predictions: TableRef | None,
    tuned_predictions: TableRef | None,
    filtered_split: TableRef | None,
) -> dg.Output[TableRef]:
    spec: ReportSpec = resolve(profile.get().report, config)
    refs = (require(base_predictions, "base_predictions"), require(tuned_predictions, "tuned_predictions"),
            require(filtered_split, "filtered_split"))
    inputs = _read_inputs(store, *refs)
    scoring, report = _score(context, scorer, inputs, spec, model)
    _write_history(context, store, spec=spec, profile_name=profile.name, base_model=model.choice().model, inputs=inputs,
                   refs=refs, scoring=scoring, report=report)
    context.log.info(f"base vs tuned on {len(inputs.dialogues)} {inputs.split} dialogues:\n{text_table(REPORT_HEADER, report_rows(report), rule=False)}")
    version = version_of([(m["model"], m["metric"], m["reference_set"], m["value"]) for m in report.metrics], scoring.hash)
    details = {"adapter_id": inputs.adapter_id, "split": inputs.split, "generation": inputs.generation}
    ref = TableRef(asset="bertscore_report", run_id=context.run.run_id, rows=len(report.metrics), content_hash=version, data_version=version,
                   details=details)
    return dg.Output(ref, metadata=_report_metadata(inputs, report, scoring.hash), data_version=dg.DataVersion(version))
