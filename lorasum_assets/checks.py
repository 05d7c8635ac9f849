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

ALL_CHECKS = [quarantine_share_within_limit, labels_end_with_eos, tuned_f1_not_below_base]
