"""Writes off the hot path: a training step hands its log line over and goes on at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class BackgroundWriter(Generic[T]):
    """Collects items and writes them in batches from a thread of its own, every ``interval_s``.

    ``put`` never waits on the store. A write that fails is reported through ``on_error`` (the
    first failure and the last) and its batch is tried again with the next one; ``close`` writes what is left and waits for it,
    reporting once when that takes longer than ``report_after_s``.
    """

    def __init__(
        self,
        write_batch: Callable[[Sequence[T]], None],
        *,
        interval_s: float = 2.0,
        on_error: Callable[[str], None] = print,
        report_after_s: float = 10.0,
        name: str = "lorasum-history-writer",
    ) -> None:
        self._write_batch = write_batch
        self._interval_s = interval_s
        self._on_error = on_error
        self._report_after_s = report_after_s
        self._pending: list[T] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.batches_written = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: T) -> None:
        with self._lock:
            self._pending.append(item)

    def _drain(self) -> list[T]:
        with self._lock:
            batch, self._pending = self._pending, []
        return batch

    def _write(self, batch: list[T]) -> None:
        try:
            self._write_batch(batch)
            self.batches_written += 1
        except Exception as exc:  # the store is busy or down: keep the rows for the next round
            self.failures += 1
            if self.failures == 1 or self._stop.is_set():  # once, and at the end, not every round
                self._on_error(f"history write of {len(batch)} row(s) failed, will retry: {exc}")
            with self._lock:
                self._pending[:0] = batch
            if self._stop.is_set():
                raise

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self._interval_s)
            batch = self._drain()
            if batch:
                try:
                    self._write(batch)
                except Exception:
                    return
            if stopping:
                return

    def close(self, what: str = "the last history rows") -> bool:
        """Write what is left; True when everything was written."""
        self._stop.set()
        start = time.monotonic()
        self._thread.join(self._report_after_s)
        if self._thread.is_alive():
            self._on_error(f"still writing {what} after {time.monotonic() - start:.0f}s: the history is busy")
            self._thread.join()
        with self._lock:
            return not self._pending
