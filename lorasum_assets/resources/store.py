"""The history store: ``DuckDBResource`` plus schema migration and lock retries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dagster_duckdb import DuckDBResource
from pydantic import PrivateAttr

from lorasum_assets.store.history import with_lock_retry
from lorasum_assets.store.schema import migrate


class LorasumStore(DuckDBResource):
    """Opens short-lived connections. The first one migrates the database to the current schema;
    later ones (training opens one per logged step) skip that."""

    lock_timeout_s: float = 120.0

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
