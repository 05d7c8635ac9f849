"""Writes to the history, each one short transaction (``transactions.in_transaction``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from lorasum_assets.store.schema import rows_table
from lorasum_assets.store.transactions import in_transaction


def insert_rows(con, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    """Every row in one INSERT: one data file (or inlined rows) per table and write, not one per row."""
    rows = list(rows)
    if not rows:
        return 0
    frame = pa.table({column: [row[i] for row in rows] for i, column in enumerate(columns)})
    name = f"_lorasum_rows_{id(frame)}"
    quoted = ", ".join(f'"{c}"' for c in columns)
    con.register(name, frame)
    try:
        con.execute(f"INSERT INTO {table} ({quoted}) SELECT {quoted} FROM {name}")
    finally:
        con.unregister(name)
    return len(rows)


KEEP_MATERIALIZATIONS = 10


def write_materialization(
    con,
    asset: str,
    run_id: str,
    tables: dict[str, tuple[Sequence[str], Iterable[Sequence[Any]]]],
    content_hash: str | None = None,
    data_version: str | None = None,
    keep: int = KEEP_MATERIALIZATIONS,
) -> int:
    """One materialization of ``asset``: its rows in each of ``tables``, keyed by ``run_id``, and
    its entry in ``materializations``, in one transaction. A retry of the same run replaces its
    own rows. Rows of all but the asset's newest ``keep`` materializations are pruned.

    Returns the row count of the first table.
    """
    materialized = {table: (columns, list(rows)) for table, (columns, rows) in tables.items()}
    counts = [len(rows) for _, rows in materialized.values()]

    def body(con) -> None:
        for table, (columns, rows) in materialized.items():
            physical = rows_table(table)
            con.execute(f"DELETE FROM {physical} WHERE run_id = ?", [run_id])
            insert_rows(con, physical, ("run_id", *columns), [(run_id, *r) for r in rows])
        con.execute("DELETE FROM materializations WHERE asset = ? AND run_id = ?", [asset, run_id])
        con.execute(
            "INSERT INTO materializations VALUES (?, ?, now(), ?, ?, ?)", [asset, run_id, counts[0] if counts else 0, content_hash, data_version]
        )
        stale = [
            r[0]
            for r in con.execute(
                "SELECT run_id FROM materializations WHERE asset = ? ORDER BY materialized_at DESC OFFSET ?", [asset, keep]
            ).fetchall()
        ]
        for old_run in stale:
            for table in materialized:
                con.execute(f"DELETE FROM {rows_table(table)} WHERE run_id = ?", [old_run])
            con.execute("DELETE FROM materializations WHERE asset = ? AND run_id = ?", [asset, old_run])

    in_transaction(con, body, f"writing {asset}")
    return counts[0] if counts else 0


def replace_rows(con, table: str, key: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    """Delete the rows matching ``key``, then insert ``rows`` (DuckLake has no primary keys: this
    is how a write stays idempotent)."""
    where = " AND ".join(f'"{c}" = ?' for c in key)
    con.execute(f"DELETE FROM {table} WHERE {where}", list(key.values()))
    if rows:
        columns = list(rows[0])
        insert_rows(con, table, columns, [[r[c] for c in columns] for r in rows])


def register_adapter(con, row: dict[str, Any]) -> None:
    row = dict(row)
    row["config"] = json.dumps(row["config"], sort_keys=True)
    in_transaction(con, lambda con: replace_rows(con, "adapters", {"adapter_id": row["adapter_id"]}, [row]), "registering an adapter")


def _step_row(train_key: str, run_id: str, log: Any) -> dict[str, Any]:
    return {
        "train_key": train_key, "run_id": run_id, "step": log.step, "epoch": log.epoch, "loss": log.loss,
        "learning_rate": log.learning_rate, "grad_norm": log.grad_norm, "label_tokens": log.label_tokens,
        "seconds": log.seconds, "logged_at": datetime.now(UTC).replace(tzinfo=None),
    }


def record_training_log(
    con,
    train_key: str,
    run_id: str,
    steps: Sequence[Any] = (),
    epochs: Sequence[tuple[int, float | None]] = (),
    replace_all: bool = False,
) -> None:
    """Steps and epochs of one run's training, in one transaction. They are keyed by (run_id,
    step) and (run_id, epoch): a step logged twice by one run is kept once, and no run overwrites
    another's log. ``replace_all`` rewrites the run's whole log."""

    def body(con) -> None:
        for table, column, keys, rows in (
            ("training_steps", "step", [log.step for log in steps], [_step_row(train_key, run_id, log) for log in steps]),
            ("training_epochs", "epoch", [e for e, _ in epochs],
             [{"train_key": train_key, "run_id": run_id, "epoch": e, "val_loss": v} for e, v in epochs]),
        ):
            if replace_all:
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
            elif keys:
                con.execute(f"DELETE FROM {table} WHERE run_id = ? AND {column} IN (SELECT unnest(?))", [run_id, keys])
            if rows:
                insert_rows(con, table, list(rows[0]), [list(r.values()) for r in rows])

    in_transaction(con, body, "logging training steps")


def write_evaluation(
    con,
    run: dict[str, Any],
    metrics: Sequence[dict[str, Any]],
    examples: Sequence[dict[str, Any]],
    scope: dict[str, Any] | None = None,
) -> None:
    """One evaluation run's history rows, replacing any earlier attempt of the same run id.
    ``scope`` (dataset, generation_hash) says which other evaluations its scores pair with."""
    run = dict(run)
    run["params"] = json.dumps(run.get("params", {}), sort_keys=True, default=str)
    run_id = run["run_id"]

    def body(con) -> None:
        replace_rows(con, "eval_examples", {"run_id": run_id}, examples)
        replace_rows(con, "eval_metrics", {"run_id": run_id}, metrics)
        replace_rows(con, "eval_runs", {"run_id": run_id}, [run])
        if scope is not None:
            replace_rows(con, "eval_scope", {"run_id": run_id}, [{"run_id": run_id, **scope}])

    in_transaction(con, body, "writing an evaluation")


def record_run_failure(con, run_id: str, job_name: str, error: str) -> None:
    row = {"run_id": run_id, "job_name": job_name, "failed_at": datetime.now(UTC).replace(tzinfo=None), "error": error[:4000]}
    in_transaction(con, lambda con: replace_rows(con, "run_failures", {"run_id": run_id}, [row]), "recording a run failure")
