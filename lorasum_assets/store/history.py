"""Writes to the lorasum DuckDB database, each one short transaction."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from lorasum_assets.store.schema import rows_table

T = TypeVar("T")
LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")


class DatabaseBusyError(RuntimeError):
    """Another process held the database for longer than we were willing to wait."""


def is_lock_error(exc: BaseException) -> bool:
    return any(marker in str(exc) for marker in LOCK_MARKERS)


def with_lock_retry(action: Callable[[], T], timeout_s: float = 60.0, what: str = "the lorasum database") -> T:
    """Run ``action``, retrying with jittered backoff while another process holds the file lock."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return action()
        except Exception as exc:  # duckdb raises IOException for lock conflicts
            if not is_lock_error(exc):
                raise
            if time.monotonic() >= deadline:
                raise DatabaseBusyError(
                    f"{what} is locked by another process (a pipeline run writing?) and stayed locked for "
                    f"{timeout_s:.0f}s; try again when the run finishes"
                ) from exc
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)


@contextmanager
def transaction(con):
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


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
    counts = []
    with transaction(con):
        for table, (columns, rows) in tables.items():
            rows = list(rows)
            counts.append(len(rows))
            physical = rows_table(table)
            quoted = ", ".join(f'"{c}"' for c in ("run_id", *columns))
            placeholders = ", ".join("?" for _ in range(len(columns) + 1))
            con.execute(f"DELETE FROM {physical} WHERE run_id = ?", [run_id])
            if rows:
                con.executemany(f"INSERT INTO {physical} ({quoted}) VALUES ({placeholders})", [(run_id, *r) for r in rows])
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
            for table in tables:
                con.execute(f"DELETE FROM {rows_table(table)} WHERE run_id = ?", [old_run])
            con.execute("DELETE FROM materializations WHERE asset = ? AND run_id = ?", [asset, old_run])
    return counts[0] if counts else 0


def register_adapter(con, row: dict[str, Any]) -> None:
    row = dict(row)
    row["config"] = json.dumps(row["config"], sort_keys=True)
    columns = list(row)
    with transaction(con):
        con.execute("DELETE FROM adapters WHERE adapter_id = ?", [row["adapter_id"]])
        con.execute(
            f"INSERT INTO adapters ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
            [row[c] for c in columns],
        )


def record_training_step(con, train_key: str, run_id: str, log: Any) -> None:
    """Steps are keyed by (run_id, step): a step logged twice by one run is kept once, and no run
    overwrites another's log."""
    con.execute(
        "INSERT OR REPLACE INTO training_steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
        [train_key, run_id, log.step, log.epoch, log.loss, log.learning_rate, log.grad_norm, log.label_tokens, log.seconds],
    )


def record_training_epoch(con, train_key: str, run_id: str, epoch: int, val_loss: float | None) -> None:
    con.execute("INSERT OR REPLACE INTO training_epochs VALUES (?, ?, ?, ?)", [train_key, run_id, epoch, val_loss])


def write_evaluation(
    con,
    run: dict[str, Any],
    metrics: Sequence[dict[str, Any]],
    examples: Sequence[dict[str, Any]],
) -> None:
    """One evaluation run's history rows, replacing any earlier attempt of the same run id."""
    run = dict(run)
    run["params"] = json.dumps(run.get("params", {}), sort_keys=True, default=str)
    run_id = run["run_id"]
    with transaction(con):
        for table in ("eval_examples", "eval_metrics", "eval_runs"):
            con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
        columns = list(run)
        con.execute(
            f"INSERT INTO eval_runs ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
            [run[c] for c in columns],
        )
        if metrics:
            columns = list(metrics[0])
            con.executemany(
                f"INSERT INTO eval_metrics ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
                [[m[c] for c in columns] for m in metrics],
            )
        if examples:
            columns = list(examples[0])
            con.executemany(
                f"INSERT INTO eval_examples ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
                [[e[c] for c in columns] for e in examples],
            )


def record_run_failure(con, run_id: str, job_name: str, error: str) -> None:
    with transaction(con):
        con.execute("DELETE FROM run_failures WHERE run_id = ?", [run_id])
        con.execute("INSERT INTO run_failures VALUES (?, ?, now(), ?)", [run_id, job_name, error[:4000]])
