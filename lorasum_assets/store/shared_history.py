"""Evaluation history shared by runs on many machines: one set of Parquet files per run.

When runs execute on different pods, none of them can share one DuckDB file. Each run keeps
writing its own DuckDB as usual and, at the end of a step, copies the rows it wrote (those with
its ``run_id``) to ``<uri>/<table>/run_id=<run id>.parquet``. No two runs write the same object
and a retried run overwrites its own files, so the export is append-only and idempotent per run.
``open_shared_history`` gives readers a DuckDB connection with the same tables and views as the
local store, read from those files: the CLI and any SQL work against either.

``uri`` is a folder or any URL DuckDB reads and writes (``s3://``, ``gs://``, ``az://`` through
its httpfs/azure extensions, configured with DuckDB secrets).
"""

from __future__ import annotations

import re

from lorasum_assets.store.schema import HISTORY_TABLES, migrate

_SAFE_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _table_uri(uri: str, table: str) -> str:
    return f"{uri.rstrip('/')}/{table}"


def _ensure_folder(uri: str) -> None:
    if "://" not in uri:
        from pathlib import Path

        for table in HISTORY_TABLES:
            Path(_table_uri(uri, table)).mkdir(parents=True, exist_ok=True)


def export_run(con, uri: str, run_id: str) -> dict[str, int]:
    """Copy one run's rows of every history table to ``uri``; returns rows written per table."""
    if not _SAFE_RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} cannot name a file")
    _ensure_folder(uri)
    written = {}
    for table in HISTORY_TABLES:
        count = con.execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", [run_id]).fetchone()[0]
        if not count:
            continue
        target = f"{_table_uri(uri, table)}/run_id={run_id}.parquet"
        # COPY takes no parameters; run_id is checked above to be a plain token.
        con.execute(f"COPY (SELECT * FROM {table} WHERE run_id = {_quote(run_id)}) TO {_quote(target)} (FORMAT parquet)")
        written[table] = count
    return written


def open_shared_history(uri: str):
    """An in-memory DuckDB holding every run's history rows from the Parquet files under ``uri``."""
    import duckdb

    con = duckdb.connect()
    migrate(con)  # the same tables and views as a local store
    for table in HISTORY_TABLES:
        pattern = f"{_table_uri(uri, table)}/*.parquet"
        try:
            # Files written by an older lorasum lack the newer columns: union_by_name fills them with NULL.
            keyed = con.execute(
                "SELECT count(*) FROM duckdb_constraints() WHERE table_name = ? AND constraint_type = 'PRIMARY KEY'", [table]
            ).fetchone()[0]
            verb = "INSERT OR REPLACE" if keyed else "INSERT"
            con.execute(f"{verb} INTO {table} BY NAME SELECT * FROM read_parquet({_quote(pattern)}, union_by_name = true)")
        except duckdb.IOException as exc:
            if "No files found" not in str(exc):
                raise
    return con
