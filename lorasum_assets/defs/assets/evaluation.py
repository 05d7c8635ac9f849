"""bertscore_report: BERTScore and ROUGE for base vs tuned, appended to the evaluation history."""

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import dagster as dg

from lorasum_assets import __version__
from lorasum_assets.defs.assets.data import dataset_of, read_dialogues, require
from lorasum_assets.defs.assets.plots import histogram, markdown_table, text_table
from lorasum_assets.defs.assets.plots import table as table_value
from lorasum_assets.defs.resources import BertScorerResource, LoraModelResource, LorasumStore, ProfileResource
from lorasum_assets.ml.stats import percent_difference
from lorasum_assets.settings.config import config_class, resolve
from lorasum_assets.settings.specs import EVAL_METRICS as METRICS
from lorasum_assets.settings.specs import ReportSpec
from lorasum_assets.settings.versions import code_version
from lorasum_assets.store.history import write_evaluation
from lorasum_assets.store.queries import adapter_sha256, evaluated_set_hash, prediction_rows
from lorasum_assets.store.references import TableRef, version_of

ReportConfig = config_class("ReportConfig", ReportSpec, "Bootstrap settings of the confidence intervals.")


# Short headers (the UI does not wrap them) so the table fits the asset page at 1440 px; what each
# column means is in the table's schema and the asset's description.
REPORT_COLUMNS = {
    "metric": "the metric",
    "base": "the base model's mean over the examples [95% bootstrap CI]",
    "tuned": "the tuned model's mean [95% bootstrap CI]",
    "tuned − base": "the mean per-example difference [paired 95% bootstrap CI]",
    "sig.": "▲ or ▼ when the paired CI lies wholly above or below 0, else –",
    "% diff": "tuned vs base in percent of base",
}
REPORT_HEADER = tuple(REPORT_COLUMNS)
# Names as papers print them: short enough that the table fits the asset page at 1440 px.
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


def report_rows(report) -> list[tuple]:
    from lorasum_assets.ml.report import metric_value

    """The notebook's two tables (scores, and the tuned-vs-base percentage difference) as one, with
    CIs; three decimals, and each CI beside its value so the browser wraps it under the value."""
    rows = []
    for metric in METRICS:
        base = metric_value(report, "base", metric)
        tuned = metric_value(report, "tuned", metric)
        delta = metric_value(report, "delta", metric)
        rows.append((
            METRIC_LABELS[metric], _with_ci(base), _with_ci(tuned), _with_ci(delta, signed=True),
            significance_mark(delta), percent_difference(base["value"], tuned["value"], digits=1),
        ))
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


def _score(context, scorer, inputs: ScoredInputs, spec: ReportSpec):
    from lorasum_assets.ml.report import score_predictions

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
    run_id = context.run_id
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


def _report_metadata(inputs: ScoredInputs, report, scorer_hash: str) -> dict:
    from lorasum_assets.ml.report import metric_value

    dialogues = inputs.dialogues
    f1_base, f1_tuned = report.per_example["base"]["bertscore_f1"], report.per_example["tuned"]["bertscore_f1"]
    deltas = [t - b for t, b in zip(f1_tuned, f1_base)]
    side_by_side = markdown_table(
        ["id", "dialogue (start)", "reference", "base", "tuned", "F1 Δ"],
        [(d.id, d.dialogue[:160] + "…", d.references[0], inputs.base[d.id][0], inputs.tuned[d.id][0], deltas[i])
         for i, d in list(enumerate(dialogues))[:5]],
    )
    metadata = {
        "dagster/row_count": len(report.metrics),
        "n_examples": len(dialogues),
        "adapter_id": inputs.adapter_id,
        "scorer_hash": scorer_hash,
        "empty_predictions": report.empty_predictions,
        "report": table_value(REPORT_HEADER, report_rows(report), descriptions=REPORT_COLUMNS),
        "examples": dg.MetadataValue.md(side_by_side),
        "f1_delta_histogram": histogram(deltas, "Per-example BERTScore F1, tuned − base", "F1 delta", bins=20),
    }
    for model_name in ("base", "tuned"):
        for metric in METRICS:
            metadata[f"{model_name}_{metric}"] = round(metric_value(report, model_name, metric)["value"], 4)
    return metadata


@dg.asset(
    group_name="evaluation",
    kinds={"python", "duckdb"},
    code_version=code_version(__name__),
    description=(
        "BERTScore P/R/F1 and ROUGE of base and tuned on the same examples, one history row set per run. In the report "
        "table each score is mean [95% bootstrap CI]; tuned − base has the paired CI, and sig. marks ▲/▼ when it excludes 0."
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
    scoring, report = _score(context, scorer, inputs, spec)
    _write_history(context, store, spec=spec, profile_name=profile.name, base_model=model.choice().model, inputs=inputs,
                   refs=refs, scoring=scoring, report=report)
    context.log.info(f"base vs tuned on {len(inputs.dialogues)} {inputs.split} dialogues:\n{text_table(REPORT_HEADER, report_rows(report))}")
    version = version_of([(m["model"], m["metric"], m["reference_set"], m["value"]) for m in report.metrics], scoring.hash)
    details = {"adapter_id": inputs.adapter_id, "split": inputs.split, "generation": inputs.generation}
    ref = TableRef("bertscore_report", context.run_id, len(report.metrics), version, version, details)
    return dg.Output(ref, metadata=_report_metadata(inputs, report, scoring.hash), data_version=dg.DataVersion(version))
