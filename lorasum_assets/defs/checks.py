"""Data-quality checks (blocking) and metric checks on the evaluation.

Each check reads the materialization of its asset made in the same run (the run's lineage),
never the newest rows of a table that concurrent runs write too.
"""

import dagster as dg

from lorasum_assets.defs.assets.data import raw_dialogsum, tokenized_dataset
from lorasum_assets.defs.assets.evaluation import bertscore_report
from lorasum_assets.defs.assets.predictions import base_predictions, empty_summaries, tuned_predictions
from lorasum_assets.defs.resources import LorasumStore
from lorasum_assets.defs.resources.lineage import reference_in_lineage
from lorasum_assets.store.queries import best_other_tuned, empty_predictions, label_mask_counts, quarantine_reasons, report_values
from lorasum_assets.store.references import TableRef


def _reference(context: dg.AssetCheckExecutionContext, asset: dg.AssetsDefinition) -> TableRef | None:
    return reference_in_lineage(context.instance, asset.key, context.run.run_id)


def _no_reference(severity: dg.AssetCheckSeverity) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, severity=severity, metadata={"reason": "the asset has no materialization to check"})


@dg.asset_check(
    asset=raw_dialogsum,
    blocking=True,
    description="Quarantined rows stay under the run's max_quarantine_share (raw_dialogsum config).",
)
def quarantine_share_within_limit(context: dg.AssetCheckExecutionContext, store: LorasumStore) -> dg.AssetCheckResult:
    ref = _reference(context, raw_dialogsum)
    if ref is None:
        return _no_reference(dg.AssetCheckSeverity.ERROR)
    limit = ref.details["max_quarantine_share"]
    with store.connect() as con:
        reasons = quarantine_reasons(con, ref.run_id)
    quarantined = sum(n for _, n in reasons)
    kept = ref.rows
    share = quarantined / max(kept + quarantined, 1)
    passed = share <= limit
    metadata = {"quarantined": quarantined, "kept": kept, "share": round(share, 4), "limit": limit, "reasons": dict(reasons)}
    description = None
    if not passed:
        description = (
            f"{quarantined} of {kept + quarantined} rows quarantined ({share:.1%} > {limit:.1%}): "
            f"{', '.join(f'{n} {kind}' for kind, n in reasons)}. See table raw_dialogsum_quarantine; "
            "to accept more, set ops.raw_dialogsum.config.max_quarantine_share."
        )
    return dg.AssetCheckResult(passed=passed, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata, description=description)


@dg.asset_check(asset=tokenized_dataset, blocking=True, description="Every row trains on its summary and ends with EOS.")
def labels_end_with_eos(context: dg.AssetCheckExecutionContext, store: LorasumStore) -> dg.AssetCheckResult:
    ref = _reference(context, tokenized_dataset)
    if ref is None:
        return _no_reference(dg.AssetCheckSeverity.ERROR)
    with store.connect() as con:
        bad, total = label_mask_counts(con, ref.run_id)
    return dg.AssetCheckResult(passed=bad == 0, severity=dg.AssetCheckSeverity.ERROR, metadata={"bad_rows": bad, "rows": total})


@dg.asset_check(asset=bertscore_report, description="Tuned BERTScore F1 is at least the base F1.")
def tuned_f1_not_below_base(context: dg.AssetCheckExecutionContext, store: LorasumStore) -> dg.AssetCheckResult:
    ref = _reference(context, bertscore_report)
    if ref is None:
        return _no_reference(dg.AssetCheckSeverity.WARN)
    with store.connect() as con:
        values = report_values(con, ref.run_id, "bertscore_f1")
    passed = "tuned" in values and values["tuned"][0] >= values["base"][0]
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"run_id": ref.run_id, "base_f1": values.get("base", (None,))[0], "tuned_f1": values.get("tuned", (None,))[0]},
    )


def _figure(value: float | None) -> float | None:
    """A score as a person reads it: 4 significant digits."""
    return None if value is None else float(f"{value:.4g}")


def compare_with_previous_best(con, run_id: str, metric: str) -> tuple[bool, dict]:
    """Whether run ``run_id``'s tuned ``metric`` (its CI's upper end) reaches the best earlier run's
    value on the same dataset and scorer, and the figures that decided it."""
    values = report_values(con, run_id, metric)
    if "tuned" not in values:
        return False, {"reason": f"no {metric} in run {run_id}"}
    value, ci_low, ci_high, dataset_hash, scorer_hash = values["tuned"]
    best = best_other_tuned(con, metric, dataset_hash, scorer_hash, run_id)
    metadata = {"run_id": run_id, "metric": metric, "value": _figure(value), "ci_low": _figure(ci_low), "ci_high": _figure(ci_high),
                "scorer_hash": scorer_hash}
    if best is None:
        return True, {**metadata, "previous_best": "none (first run on this dataset and scorer)"}
    metadata.update(previous_best_run=best[0], previous_best_adapter=str(best[1]), previous_best_value=_figure(best[2]))
    return ci_high >= best[2], metadata


class RegressionCheckConfig(dg.Config):
    metric: str = "bertscore_f1"
    severity: str = "WARN"  # WARN or ERROR


@dg.asset_check(
    asset=bertscore_report,
    description="The tuned model is not worse than the best earlier run on the same dataset and scorer, beyond its CI.",
)
def tuned_not_worse_than_previous_best(
    context: dg.AssetCheckExecutionContext, config: RegressionCheckConfig, store: LorasumStore
) -> dg.AssetCheckResult:
    severity = dg.AssetCheckSeverity[config.severity.upper()]
    ref = _reference(context, bertscore_report)
    if ref is None:
        return _no_reference(severity)
    with store.connect() as con:
        passed, metadata = compare_with_previous_best(con, ref.run_id, config.metric)
    return dg.AssetCheckResult(passed=passed, severity=severity, metadata=metadata)


def _summaries_not_empty(asset: dg.AssetsDefinition) -> dg.AssetChecksDefinition:
    name = asset.key.path[-1]

    @dg.asset_check(asset=asset, name="summaries_not_empty", description="Every dialogue got a summary; an empty one is named.")
    def check(context: dg.AssetCheckExecutionContext, store: LorasumStore) -> dg.AssetCheckResult:
        ref = _reference(context, asset)
        if ref is None:
            return _no_reference(dg.AssetCheckSeverity.WARN)
        with store.connect() as con:
            empty, rows = empty_predictions(con, name, ref.run_id)
        description = None
        if empty:
            description = f"{empty_summaries(empty, rows, name + ' summaries')}; they score 0 and pull the mean down"
        return dg.AssetCheckResult(passed=not empty, severity=dg.AssetCheckSeverity.WARN, description=description,
                                   metadata={"empty": len(empty), "rows": rows, "empty_ids": ", ".join(empty[:10]) or "none"})

    return check


ALL_CHECKS = [quarantine_share_within_limit, labels_end_with_eos, tuned_f1_not_below_base, tuned_not_worse_than_previous_best,
              _summaries_not_empty(base_predictions), _summaries_not_empty(tuned_predictions)]
