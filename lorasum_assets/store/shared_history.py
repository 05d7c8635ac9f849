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

from lorasum_assets.store.schema import HISTORY_TABLES, MIGRATIONS

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


def _create_statements() -> dict[str, str]:
    statements = {}
    for statement in MIGRATIONS[0]:
        match = re.match(r"\s*CREATE TABLE IF NOT EXISTS (\w+)", statement)
        if match:
            statements[match.group(1)] = statement
    return statements


def _views() -> list[str]:
    return [s for migration in MIGRATIONS for s in migration if s.lstrip().startswith("CREATE OR REPLACE VIEW")]


def open_shared_history(uri: str):
    """An in-memory DuckDB holding every run's history rows from the Parquet files under ``uri``."""
    import duckdb

    con = duckdb.connect()
    creates = _create_statements()
    for table in HISTORY_TABLES:
        pattern = f"{_table_uri(uri, table)}/*.parquet"
        con.execute(creates[table].replace("IF NOT EXISTS", "", 1))
        try:
            # A step logged by a killed run and again by its resumed run: the later logging wins.
            verb = "INSERT OR REPLACE" if "PRIMARY KEY" in creates[table] else "INSERT"
            order = " ORDER BY logged_at" if table == "training_steps" else ""
            con.execute(
                f"{verb} INTO {table} BY NAME SELECT * FROM read_parquet({_quote(pattern)}, union_by_name = true){order}"
            )
        except duckdb.IOException as exc:
            if "No files found" not in str(exc):
                raise
    for view in _views():
        con.execute(view)
    return con
