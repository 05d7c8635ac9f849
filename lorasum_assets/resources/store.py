"""The history store: ``DuckDBResource`` plus schema migration and lock retries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dagster_duckdb import DuckDBResource

from lorasum_assets.store.history import with_lock_retry
from lorasum_assets.store.schema import migrate


class LorasumStore(DuckDBResource):
    """Opens short-lived connections; each one is migrated to the current schema first."""

    lock_timeout_s: float = 120.0

    @contextmanager
    def connect(self) -> Iterator:
        stack = []

        def open_connection():
            manager = self.get_connection()
            con = manager.__enter__()
            try:
                migrate(con)
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
