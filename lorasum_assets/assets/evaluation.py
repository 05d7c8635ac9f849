"""bertscore_report: BERTScore and ROUGE for base vs tuned, appended to the evaluation history."""

import time
from datetime import UTC, datetime

import dagster as dg

from lorasum_assets import __version__
from lorasum_assets.assets.data import dataset_of, read_dialogues, require
from lorasum_assets.assets.plots import histogram, markdown_table
from lorasum_assets.assets.plots import table as table_value
from lorasum_assets.config import config_class, resolve
from lorasum_assets.ml.report import METRICS, metric_value, score_predictions
from lorasum_assets.ml.specs import ReportSpec
from lorasum_assets.ml.stats import percent_difference
from lorasum_assets.profiles import get_profile
from lorasum_assets.resources import BertScorerResource, LoraModelResource, LorasumStore, ProfileResource
from lorasum_assets.store.history import write_evaluation
from lorasum_assets.store.queries import adapter_sha256, evaluated_set_hash, prediction_rows
from lorasum_assets.store.references import TableRef, version_of
from lorasum_assets.versions import code_version

_DEFAULT = get_profile()
ReportConfig = config_class("ReportConfig", ReportSpec, "Bootstrap settings of the confidence intervals.")


REPORT_HEADER = ("metric", "base (95% CI)", "tuned (95% CI)", "tuned − base (paired 95% CI)", "significant", "% difference")


def report_rows(report) -> list[tuple]:
    """The notebook's two tables (scores, and the tuned-vs-base percentage difference) with CIs."""
    rows = []
    for metric in METRICS:
        base = metric_value(report, "base", metric)
        tuned = metric_value(report, "tuned", metric)
        delta = metric_value(report, "delta", metric)
        significant = "yes" if delta["ci_low"] > 0 or delta["ci_high"] < 0 else "no"
        rows.append(
            (
                metric,
                f"{base['value']:.4f} [{base['ci_low']:.4f}, {base['ci_high']:.4f}]",
                f"{tuned['value']:.4f} [{tuned['ci_low']:.4f}, {tuned['ci_high']:.4f}]",
                f"{delta['value']:+.4f} [{delta['ci_low']:+.4f}, {delta['ci_high']:+.4f}]",
                significant,
                percent_difference(base["value"], tuned["value"]),
            )
        )
    return rows


def report_tables(report) -> str:
    return markdown_table(REPORT_HEADER, report_rows(report))


@dg.asset(
    group_name="evaluation",
    kinds={"python", "duckdb"},
    code_version=code_version(__name__, _DEFAULT.report, _DEFAULT.scorer),
    description="BERTScore P/R/F1 and ROUGE for base vs tuned with bootstrap CIs; one history row set per run.",
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
    base_ref = require(base_predictions, "base_predictions")
    tuned_ref = require(tuned_predictions, "tuned_predictions")
    dialogues_ref = require(filtered_split, "filtered_split")
    split = base_ref.details["split"]
    generation = tuned_ref.details.get("generation")
    if tuned_ref.details["split"] != split:
        raise ValueError(f"base predictions are of the {split!r} split but tuned predictions of {tuned_ref.details['split']!r}")
    with store.connect() as con:
        dialogues = read_dialogues(con, dialogues_ref, split)
        base = prediction_rows(con, base_ref.asset, base_ref.run_id)
        tuned = prediction_rows(con, tuned_ref.asset, tuned_ref.run_id)
        dataset_hash = evaluated_set_hash(con, dialogues_ref.run_id, split)
    missing = [d.id for d in dialogues if d.id not in base or d.id not in tuned]
    if missing:
        raise ValueError(f"{len(missing)} {split} dialogues lack a base or tuned prediction, e.g. {missing[:5]}")
    adapter_id = tuned_ref.details["adapter_id"]
    with store.connect() as con:
        adapter_sha = adapter_sha256(con, adapter_id)
    context.log.info(f"scoring {len(dialogues)} base and {len(dialogues)} tuned summaries with {scorer.spec().model} BERTScore and ROUGE")
    started = time.perf_counter()
    scoring = scorer.scorer()
    references = [d.references for d in dialogues]
    predictions = {"base": [base[d.id][0] for d in dialogues], "tuned": [tuned[d.id][0] for d in dialogues]}
    report = score_predictions(scoring, predictions, references, spec.bootstrap_resamples, spec.seed)
    context.log.info(f"scored in {time.perf_counter() - started:.1f} s")

    run_id = context.run_id
    run = context.instance.get_run_by_id(run_id)
    lorasum_tags = {k: v for k, v in (run.tags if run else {}).items() if k.startswith("lorasum/")}
    examples = []
    for model_name, source in (("base", base), ("tuned", tuned)):
        scores = report.per_example[model_name]
        for i, d in enumerate(dialogues):
            prediction, new_tokens, hit_limit, _ = source[d.id]
            examples.append(
                dict(
                    run_id=run_id, model=model_name, id=d.id, prediction=prediction, new_tokens=new_tokens,
                    hit_limit=hit_limit, **{m: scores[m][i] for m in METRICS}, scorer_hash=scoring.hash,
                )
            )
    metrics = [dict(run_id=run_id, **m, scorer_hash=scoring.hash) for m in report.metrics]
    with store.connect() as con:
        write_evaluation(
            con,
            dict(
                run_id=run_id,
                created_at=datetime.now(UTC).replace(tzinfo=None),
                profile=profile.name,
                params={"split": split, "bootstrap_resamples": spec.bootstrap_resamples, "seed": spec.seed,
                        "base_predictions_run": base_ref.run_id, "tuned_predictions_run": tuned_ref.run_id,
                        "tags": lorasum_tags},
                code_version=__version__,
                base_model=model.choice().model,
                dataset_hash=dataset_hash,
                split=split,
                n_examples=len(dialogues),
                adapter_id=adapter_id,
                adapter_sha256=adapter_sha,
                scorer_hash=scoring.hash,
            ),
            metrics,
            examples,
            scope=dict(dataset=dataset_of(dialogues_ref), generation_hash=version_of(generation) if generation else None),
        )

    table = report_tables(report)
    context.log.info(f"base vs tuned on {len(dialogues)} {split} dialogues:\n{table}")
    f1_base, f1_tuned = report.per_example["base"]["bertscore_f1"], report.per_example["tuned"]["bertscore_f1"]
    deltas = [t - b for t, b in zip(f1_tuned, f1_base)]
    side_by_side = markdown_table(
        ["id", "dialogue (start)", "reference", "base", "tuned", "F1 Δ"],
        [
            (d.id, d.dialogue[:160] + "…", d.references[0], predictions["base"][i], predictions["tuned"][i], deltas[i])
            for i, d in list(enumerate(dialogues))[:5]
        ],
    )
    metadata = {
        "dagster/row_count": len(report.metrics),
        "n_examples": len(dialogues),
        "adapter_id": adapter_id,
        "scorer_hash": scoring.hash,
        "empty_predictions": report.empty_predictions,
        "report": table_value(REPORT_HEADER, report_rows(report)),
        "report_markdown": dg.MetadataValue.md(table),
        "examples": dg.MetadataValue.md(side_by_side),
        "f1_delta_histogram": histogram(deltas, "Per-example BERTScore F1, tuned − base", "F1 delta", bins=20),
    }
    for model_name in ("base", "tuned"):
        for metric in METRICS:
            metadata[f"{model_name}_{metric}"] = round(metric_value(report, model_name, metric)["value"], 4)
    version = version_of([(m["model"], m["metric"], m["reference_set"], m["value"]) for m in report.metrics], scoring.hash)
    details = {"adapter_id": adapter_id, "split": split, "generation": generation}
    ref = TableRef("bertscore_report", run_id, len(report.metrics), version, version, details)
    return dg.Output(ref, metadata=metadata, data_version=dg.DataVersion(version))
