"""Data-quality checks (blocking) and metric checks on the evaluation."""

import dagster as dg

from lorasum_assets.assets.data import raw_dialogsum, tokenized_dataset
from lorasum_assets.assets.evaluation import bertscore_report
from lorasum_assets.profiles import get_profile
from lorasum_assets.resources import LorasumStore


@dg.asset_check(asset=raw_dialogsum, blocking=True, description="Quarantined rows stay under the profile's share.")
def quarantine_share_within_limit(context: dg.AssetCheckExecutionContext, store: LorasumStore) -> dg.AssetCheckResult:
    limit = get_profile().data.max_quarantine_share
    with store.connect() as con:
        kept = con.execute("SELECT count(*) FROM raw_dialogsum").fetchone()[0]
        quarantined = con.execute("SELECT count(*) FROM raw_dialogsum_quarantine").fetchone()[0]
    share = quarantined / max(kept + quarantined, 1)
    return dg.AssetCheckResult(
        passed=share <= limit,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"quarantined": quarantined, "kept": kept, "share": round(share, 4), "limit": limit},
    )


@dg.asset_check(asset=tokenized_dataset, blocking=True, description="Every row trains on its summary and ends with EOS.")
def labels_end_with_eos(context: dg.AssetCheckExecutionContext, store: LorasumStore) -> dg.AssetCheckResult:
    with store.connect() as con:
        bad = con.execute(
            """SELECT count(*) FROM tokenized_dataset
               WHERE label_tokens < 2 OR labels[-1] = -100 OR labels[-1] != input_ids[-1]"""
        ).fetchone()[0]
        total = con.execute("SELECT count(*) FROM tokenized_dataset").fetchone()[0]
    return dg.AssetCheckResult(passed=bad == 0, severity=dg.AssetCheckSeverity.ERROR, metadata={"bad_rows": bad, "rows": total})


@dg.asset_check(asset=bertscore_report, description="Tuned BERTScore F1 is at least the base F1.")
def tuned_f1_not_below_base(context: dg.AssetCheckExecutionContext, store: LorasumStore) -> dg.AssetCheckResult:
    with store.connect() as con:
        rows = dict(
            con.execute(
                """SELECT model, value FROM bertscore_report
                   WHERE metric = 'bertscore_f1' AND reference_set = 'all' AND model IN ('base', 'tuned')"""
            ).fetchall()
        )
    passed = bool(rows) and rows["tuned"] >= rows["base"]
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"base_f1": rows.get("base"), "tuned_f1": rows.get("tuned")},
    )

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
    with store.connect() as con:
        latest = con.execute(
            """SELECT run_id, dataset_hash, scorer_hash, value, ci_low, ci_high FROM bertscore_report
               WHERE model = 'tuned' AND metric = ? AND reference_set = 'all'""",
            [config.metric],
        ).fetchone()
        if latest is None:
            return dg.AssetCheckResult(passed=False, severity=severity, metadata={"reason": "no evaluation in the history"})
        run_id, dataset_hash, scorer_hash, value, ci_low, ci_high = latest
        best = con.execute(
            """SELECT run_id, adapter_id, value FROM eval_history
               WHERE model = 'tuned' AND metric = ? AND reference_set = 'all' AND dataset_hash = ?
                 AND scorer_hash = ? AND run_id != ?
               ORDER BY value DESC LIMIT 1""",
            [config.metric, dataset_hash, scorer_hash, run_id],
        ).fetchone()
    metadata = {"metric": config.metric, "value": value, "ci_low": ci_low, "ci_high": ci_high, "scorer_hash": scorer_hash}
    if best is None:
        return dg.AssetCheckResult(passed=True, severity=severity, metadata={**metadata, "previous_best": "none (first run on this dataset and scorer)"})
    metadata.update(previous_best_run=best[0], previous_best_adapter=str(best[1]), previous_best_value=best[2])
    return dg.AssetCheckResult(passed=ci_high >= best[2], severity=severity, metadata=metadata)


ALL_CHECKS = [quarantine_share_within_limit, labels_end_with_eos, tuned_f1_not_below_base, tuned_not_worse_than_previous_best]
