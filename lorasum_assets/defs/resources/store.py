"""The history store resource: connections to the DuckLake history, and a writer off the hot path."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import dagster as dg
from pydantic import Field, PrivateAttr

from lorasum_assets.store.buffer import BackgroundWriter
from lorasum_assets.store.lake import HistoryLocation, connect, history_location, prepare
from lorasum_assets.store.transactions import report_waits
from lorasum_assets.store.writes import record_training_log


class LorasumStore(dg.ConfigurableResource):
    """The history, a DuckLake: readers (a notebook, the DuckDB CLI, ``lorasum sql``) never block
    a run, and runs on many machines write one history through a PostgreSQL catalog.

    Unset fields take ``LORASUM_HISTORY`` / ``LORASUM_HISTORY_DATA``, else a SQLite catalog in the
    home. A PostgreSQL password belongs in ``PGPASSWORD`` (libpq reads it), never in ``history``.
    """

    history: str | None = Field(default=None, description="DuckLake catalog: sqlite:PATH or postgres:CONNINFO (default: LORASUM_HISTORY, else the home's)")
    data_path: str | None = Field(default=None, description="data files of a new history: a folder or s3://... (an existing history keeps its own)")
    write_timeout_s: float = Field(default=600.0, description="longest a write waits for other writers before the step fails")

    _prepared: bool = PrivateAttr(default=False)
    _report: Callable[[str], None] | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if context.log is not None:
            self._report = context.log.warning

    def location(self) -> HistoryLocation:
        return history_location(self.history, self.data_path)

    @contextmanager
    def connect(self) -> Iterator:
        """A short-lived connection. The first one in a process creates the history's tables and
        views where they are missing (and imports an older lorasum's single-file history)."""
        location = self.location()
        if not self._prepared:
            prepare(location, on_wait=self._report)
            self._prepared = True
        con = connect(location, read_only=False, on_wait=self._report, timeout_s=self.write_timeout_s)
        try:
            with report_waits(self._report, server=location.describe()):
                yield con
        finally:
            con.close()

    def training_log_writer(self, train_key: str, run_id: str, on_error: Callable[[str], None]) -> BackgroundWriter:
        """A writer for a run's step and epoch logs: each item is ``("step", StepLog)`` or
        ``("epoch", (epoch, val_loss))``; the training loop never waits for the store."""

        def write_batch(items: Sequence[tuple[str, object]]) -> None:
            steps = [value for kind, value in items if kind == "step"]
            epochs = [value for kind, value in items if kind == "epoch"]
            with self.connect() as con, report_waits(on_error):
                record_training_log(con, train_key, run_id, steps=steps, epochs=epochs)

        return BackgroundWriter(write_batch, on_error=on_error)
