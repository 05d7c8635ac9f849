"""The history store: ``DuckDBResource`` plus schema migration and lock retries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dagster_duckdb import DuckDBResource
from pydantic import PrivateAttr

from lorasum_assets.store.history import with_lock_retry
from lorasum_assets.store.schema import migrate
from lorasum_assets.store.shared_history import export_run


class LorasumStore(DuckDBResource):
    """Opens short-lived connections. The first one migrates the database to the current schema;
    later ones (training opens one per logged step) skip that.

    ``database`` is a file, or ``md:<name>`` for MotherDuck (token in ``connection_config``).
    With ``history_export_uri`` set, each run also copies its history rows to Parquet files of
    its own there, for runs on many machines to share (see ``store/shared_history.py``).
    """

    lock_timeout_s: float = 120.0
    history_export_uri: str | None = None

    _migrated: bool = PrivateAttr(default=False)

    @contextmanager
    def connect(self) -> Iterator:
        stack = []

        def open_connection():
            manager = self.get_connection()
            con = manager.__enter__()
            try:
                if not self._migrated:
                    migrate(con)
                    self._migrated = True
            except BaseException:
                manager.__exit__(None, None, None)
                raise
            stack.append(manager)
            return con

        con = with_lock_retry(open_connection, self.lock_timeout_s)
        try:
            yield con
        finally:
            stack[-1].__exit__(None, None, None)

    def export_run(self, run_id: str) -> dict[str, int]:
        """Copy this run's history rows to ``history_export_uri``; nothing when it is unset."""
        if not self.history_export_uri:
            return {}
        with self.connect() as con:
            return export_run(con, self.history_export_uri, run_id)
