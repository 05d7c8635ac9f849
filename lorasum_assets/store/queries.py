"""What assets, checks, the CLI and sweeps read from the history. No dagster.

Every read names the run whose rows it wants; nothing here picks "the newest row" unless its
name says so (``latest_evaluation``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorasum_assets.settings.specs import EVAL_METRICS
from lorasum_assets.store.schema import rows_table


def checked_metric(metric: str) -> str:
    if metric not in EVAL_METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(EVAL_METRICS)}")
    return metric


# ------------------------------------------------------------------------------------------------
# Assets


def dialogue_rows(con, asset: str, run_id: str, split: str | None = None) -> list[tuple]:
    """(split, id, dialogue, references, topic, source_index) of one materialization of
    raw_dialogsum or filtered_split, in split and source order."""
    query = f'SELECT split, id, dialogue, "references", topic, source_index FROM {rows_table(asset)} WHERE run_id = ?'
    params: list = [run_id]
    if split is not None:
        query += " AND split = ?"
        params.append(split)
    return con.execute(query + " ORDER BY split, source_index", params).fetchall()


def tokenized_rows(con, run_id: str, split: str) -> list[tuple]:
    """(id, input_ids, labels) of one split of one tokenized_dataset materialization."""
    return con.execute(
        f"SELECT id, input_ids, labels FROM {rows_table('tokenized_dataset')} WHERE run_id = ? AND split = ? ORDER BY id",
        [run_id, split],
    ).fetchall()


def prediction_rows(con, asset: str, run_id: str) -> dict[str, tuple]:
    """id -> (prediction, new_tokens, hit_limit, adapter_id) of one predictions materialization."""
    rows = con.execute(
        f"SELECT id, prediction, new_tokens, hit_limit, adapter_id FROM {rows_table(asset)} WHERE run_id = ?", [run_id]
    ).fetchall()
    return {r[0]: r[1:] for r in rows}


def evaluated_set_hash(con, filtered_run_id: str, split: str) -> str:
    """A hash of the ids and dialogues of one split of a filtered_split materialization."""
    return con.execute(
        f"SELECT sha256(string_agg(id || dialogue, '' ORDER BY id)) FROM {rows_table('filtered_split')} WHERE run_id = ? AND split = ?",
        [filtered_run_id, split],
    ).fetchone()[0]


def adapter_sha256(con, adapter_id: str) -> str | None:
    row = con.execute("SELECT sha256 FROM adapters WHERE adapter_id = ?", [adapter_id]).fetchone()
    return row[0] if row else None


# ------------------------------------------------------------------------------------------------
# Checks


def quarantine_reasons(con, run_id: str) -> list[tuple[str, int]]:
    """(kind of reason, rows) of one raw_dialogsum materialization's quarantine, most first."""
    return con.execute(
        f"""SELECT split_part(reason, ':', 1) AS kind, count(*) FROM {rows_table('raw_dialogsum_quarantine')}
            WHERE run_id = ? GROUP BY kind ORDER BY count(*) DESC""",
        [run_id],
    ).fetchall()


def label_mask_counts(con, run_id: str) -> tuple[int, int]:
    """(rows that do not train on a summary ending with EOS, all rows) of one tokenized_dataset."""
    return con.execute(
        f"""SELECT count(*) FILTER (WHERE label_tokens < 2 OR labels[-1] = -100 OR labels[-1] != input_ids[-1]), count(*)
            FROM {rows_table('tokenized_dataset')} WHERE run_id = ?""",
        [run_id],
    ).fetchone()


def empty_predictions(con, asset: str, run_id: str) -> tuple[list[str], int]:
    """(ids whose summary is empty, all rows) of one predictions materialization."""
    rows = con.execute(f"SELECT id, trim(coalesce(prediction, '')) = '' FROM {rows_table(asset)} WHERE run_id = ? ORDER BY id",
                       [run_id]).fetchall()
    return [i for i, empty in rows if empty], len(rows)


def report_values(con, run_id: str, metric: str) -> dict[str, tuple]:
    """model -> (value, ci_low, ci_high, dataset_hash, scorer_hash) of one evaluation and metric."""
    rows = con.execute(
        """SELECT model, value, ci_low, ci_high, dataset_hash, scorer_hash FROM eval_history
           WHERE run_id = ? AND metric = ? AND reference_set = 'all'""",
        [run_id, metric],
    ).fetchall()
    return {r[0]: r[1:] for r in rows}


def best_other_tuned(con, metric: str, dataset_hash: str, scorer_hash: str, run_id: str) -> tuple | None:
    """(run_id, adapter_id, value) of the best tuned score of another run on the same data and scorer."""
    return con.execute(
        """SELECT run_id, adapter_id, value FROM eval_history
           WHERE model = 'tuned' AND metric = ? AND reference_set = 'all' AND dataset_hash = ?
             AND scorer_hash = ? AND run_id != ?
           ORDER BY value DESC LIMIT 1""",
        [metric, dataset_hash, scorer_hash, run_id],
    ).fetchone()


# ------------------------------------------------------------------------------------------------
# Sweeps


def sweep_ranking(con, sweep_id: str, metric: str) -> list[tuple]:
    """(rank, point, adapter_id, value, ci_low, ci_high, best_adapters rank, run_id) of a sweep's points."""
    return con.execute(
        """SELECT rank() OVER (ORDER BY m.value DESC) AS rank,
                  json_extract_string(r.params, '$.tags."lorasum/sweep_point"') AS point,
                  r.adapter_id, m.value, m.ci_low, m.ci_high, b.rank AS best_adapters_rank, r.run_id
           FROM eval_runs r
           JOIN eval_metrics m ON m.run_id = r.run_id AND m.model = 'tuned' AND m.metric = ? AND m.reference_set = 'all'
           LEFT JOIN best_adapters b ON b.run_id = r.run_id AND b.metric = m.metric AND b.reference_set = 'all'
           WHERE json_extract_string(r.params, '$.tags."lorasum/sweep"') = ?
           ORDER BY rank""",
        [metric, sweep_id],
    ).fetchall()


# ------------------------------------------------------------------------------------------------
# The command line


def evaluation_ids_starting(con, prefix: str) -> list[str]:
    return [r[0] for r in con.execute("SELECT run_id FROM eval_runs WHERE starts_with(run_id, ?) ORDER BY created_at", [prefix]).fetchall()]


def latest_evaluation(con) -> str | None:
    row = con.execute("SELECT run_id FROM eval_runs ORDER BY created_at DESC LIMIT 1").fetchone()
    return row[0] if row else None


def evaluation_summary(con, run_id: str) -> tuple | None:
    """(profile, base_model, n_examples, split, adapter_id, scorer_hash) of one evaluation."""
    return con.execute(
        "SELECT profile, base_model, n_examples, split, adapter_id, scorer_hash FROM eval_runs WHERE run_id = ?", [run_id]
    ).fetchone()


def generation_engines(con, run_id: str) -> dict:
    """{"base": {...}, "tuned": {...}}: the engine, dtype, device and versions each side generated
    with (None for a side recorded before engines were)."""
    row = con.execute("SELECT json_extract(params, '$.engines') FROM eval_runs WHERE run_id = ?", [run_id]).fetchone()
    engines = json.loads(row[0]) if row and row[0] else {}
    return {"base": engines.get("base"), "tuned": engines.get("tuned")}


def report_table(con, run_id: str) -> list[tuple]:
    """(metric, base, tuned, delta, delta_ci_low, delta_ci_high) per metric of one evaluation."""
    return con.execute(
        """SELECT metric,
                  max(value) FILTER (WHERE model = 'base'), max(value) FILTER (WHERE model = 'tuned'),
                  max(value) FILTER (WHERE model = 'delta'), max(ci_low) FILTER (WHERE model = 'delta'),
                  max(ci_high) FILTER (WHERE model = 'delta')
           FROM eval_metrics WHERE run_id = ? AND reference_set = 'all' GROUP BY metric ORDER BY metric""",
        [run_id],
    ).fetchall()


def metric_history(con, metric: str, profile: str | None, last: int) -> list[tuple]:
    """(created_at, run_id, profile, adapter_id, base, tuned, tuned_ci_low, tuned_ci_high, delta), newest first."""
    query = """
        SELECT created_at, run_id, profile, adapter_id,
               max(value) FILTER (WHERE model = 'base') AS base,
               max(value) FILTER (WHERE model = 'tuned') AS tuned,
               max(ci_low) FILTER (WHERE model = 'tuned') AS tuned_ci_low,
               max(ci_high) FILTER (WHERE model = 'tuned') AS tuned_ci_high,
               max(value) FILTER (WHERE model = 'delta') AS delta
        FROM eval_history WHERE metric = ? AND reference_set = 'all'"""
    params: list[Any] = [metric]
    if profile:
        query += " AND profile = ?"
        params.append(profile)
    return con.execute(query + " GROUP BY ALL ORDER BY created_at DESC LIMIT ?", [*params, last]).fetchall()


def scorer_hashes(con, run_ids: list[str]) -> dict[str, str]:
    return dict(con.execute("SELECT run_id, scorer_hash FROM eval_runs WHERE run_id IN (SELECT unnest(?))", [run_ids]).fetchall())


def paired_example_scores(con, run_a: str, run_b: str, model: str, metric: str) -> list[tuple[float, float]]:
    """(score in run_a, score in run_b) of every example both runs scored for ``model``."""
    metric = checked_metric(metric)
    return con.execute(
        f"""SELECT a.{metric}, b.{metric} FROM eval_examples a JOIN eval_examples b USING (id, model)
            WHERE a.run_id = ? AND b.run_id = ? AND a.model = ? ORDER BY id""",
        [run_a, run_b, model],
    ).fetchall()


def most_changed_examples(con, run_a: str, run_b: str, limit: int) -> list[tuple]:
    """(id, f1_a, f1_b, change, prediction_a, prediction_b) of the tuned examples that moved most."""
    return con.execute(
        """SELECT a.id, a.bertscore_f1, b.bertscore_f1, b.bertscore_f1 - a.bertscore_f1 AS change, a.prediction, b.prediction
           FROM eval_examples a JOIN eval_examples b USING (id, model)
           WHERE a.run_id = ? AND b.run_id = ? AND a.model = 'tuned'
           ORDER BY abs(change) DESC LIMIT ?""",
        [run_a, run_b, limit],
    ).fetchall()


def adapter_location(con, adapter_id: str) -> tuple | None:
    """(base_model, base_revision, config, path) of a registered adapter."""
    return con.execute("SELECT base_model, base_revision, config, path FROM adapters WHERE adapter_id = ?", [adapter_id]).fetchone()


def ranked_adapters(con, metric: str, last: int) -> list[tuple]:
    """best_adapters for one metric, with each adapter's learning rate and rank."""
    return con.execute(
        """SELECT b.rank, b.adapter_id, b.value, b.ci_low, b.ci_high, b.run_id, b.dataset_hash, a.config->>'learning_rate', a.config->>'lora_r'
           FROM best_adapters b LEFT JOIN adapters a USING (adapter_id)
           WHERE b.metric = ? AND b.reference_set = 'all' ORDER BY b.dataset_hash, b.scorer_hash, b.rank LIMIT ?""",
        [metric, last],
    ).fetchall()


def adapter_listing(con) -> list[tuple]:
    """Every registered adapter, newest first, with the aliases it holds."""
    return con.execute(
        """SELECT a.adapter_id, a.created_at, a.profile, a.base_model, a.final_train_loss, a.final_val_loss,
                  string_agg(p.alias || ' (' || p.dataset || ')', ', ') AS aliases, a.sha256
           FROM adapters a LEFT JOIN production_adapters p USING (adapter_id) GROUP BY ALL ORDER BY a.created_at DESC"""
    ).fetchall()


def export_table(con, table: str, target: Path, file_format: str) -> int:
    """Write one history table to ``target`` (parquet or csv); returns its row count."""
    option = "(FORMAT parquet)" if file_format == "parquet" else "(FORMAT csv, HEADER)"
    quoted = target.as_posix().replace("'", "''")
    con.execute(f"COPY (SELECT * FROM {table}) TO '{quoted}' {option}")
    return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
