"""Single-file histories of lorasum before the DuckLake (schema v1 and v2): brought up to v2 in
place, then copied into the lake in one transaction."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import duckdb

from lorasum_assets.store.schema import migrate_file
from lorasum_assets.store.transactions import in_transaction, retry_busy


def import_legacy_file(con, path: Path, on_wait: Callable[[str], None] | None = None) -> dict[str, int]:
    """Copy every row of a single-file history into the DuckLake one, in one transaction; returns
    rows copied per table. The file is first brought up to v2 in place."""
    def upgrade_file() -> None:
        legacy = duckdb.connect(str(path))
        try:
            migrate_file(legacy)
        finally:
            legacy.close()

    retry_busy(upgrade_file, f"the old history file {path}", on_wait=on_wait)
    quoted = "'" + str(path).replace("'", "''") + "'"
    con.execute(f"ATTACH {quoted} AS legacy_history (READ_ONLY)")
    try:
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = 'legacy_history' AND table_name <> 'schema_version'"
        ).fetchall()]

        def copy(con) -> dict[str, int]:
            copied = {}
            for table in tables:
                copied[table] = con.execute(f"SELECT count(*) FROM legacy_history.main.{table}").fetchone()[0]
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM legacy_history.main.{table}")
            return copied

        return in_transaction(con, copy, f"importing {path}")
    finally:
        con.execute("DETACH legacy_history")
