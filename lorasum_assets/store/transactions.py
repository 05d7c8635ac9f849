"""Transactions on the history: one short transaction per write, retried whole while the history is
busy or its server is away, with errors that name the server and the wait."""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from lorasum_assets.settings.env import HISTORY_WAIT_ENV, get_env

T = TypeVar("T")
# DuckLake reports a busy SQLite catalog, a commit that lost a race to another writer, and a
# PostgreSQL serialization failure with these; a single-file DuckDB with "Conflicting lock".
BUSY_MARKERS = (
    "database is locked",
    "Transaction conflict",
    "could not serialize access",
    "deadlock detected",
    "Could not set lock",
    "Conflicting lock",
    # two machines creating a PostgreSQL-catalogued history at the same moment: the second's
    # inserts or its CREATE TABLE of DuckLake's own tables fail once the first commits
    "duplicate key value violates unique constraint",
    'relation "ducklake_',
)
# A PostgreSQL catalog server that is down, restarting or unreachable (libpq's and DuckDB's words).
UNREACHABLE_MARKERS = (
    "server closed the connection unexpectedly",
    "could not connect to server",
    "connection to server",
    "Connection refused",
    "terminating connection due to administrator command",
    "the database system is shutting down",
    "the database system is starting up",
    "no connection to the server",
    "SSL connection has been closed unexpectedly",
)
WAIT_REPORT_AFTER_S = 10.0
DEFAULT_SERVER_WAIT_S = 300.0
_wait_reporter: ContextVar[Callable[[str], None] | None] = ContextVar("lorasum_wait_reporter", default=None)
_history_server: ContextVar[str | None] = ContextVar("lorasum_history_server", default=None)
_log = logging.getLogger("lorasum.store")


class DatabaseBusyError(RuntimeError):
    """The history stayed busy for longer than we were willing to wait."""


class HistoryUnreachableError(RuntimeError):
    """The history's catalog server stayed unreachable past the wait ``LORASUM_HISTORY_WAIT_S`` allows."""


def is_busy_error(exc: BaseException) -> bool:
    return any(marker in str(exc) for marker in BUSY_MARKERS)


def is_unreachable_error(exc: BaseException) -> bool:
    return any(marker in str(exc) for marker in UNREACHABLE_MARKERS)


def server_wait_s() -> float:
    """How long a write or read waits for an unreachable history server (``LORASUM_HISTORY_WAIT_S``)."""
    text = get_env(HISTORY_WAIT_ENV)
    if text is None:
        return DEFAULT_SERVER_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ValueError(f"{HISTORY_WAIT_ENV}={text!r}: expected a number of seconds, 0 or more")
    return value


def _unreachable_reason(exc: BaseException) -> str:
    """The line of the driver's message that says why, without DuckDB's query context."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        for marker in UNREACHABLE_MARKERS:
            if marker in line:
                return line[line.index(marker):][:300].rstrip(":")
    return lines[0][:300] if lines else type(exc).__name__


class _Outages:
    """One record per history server that stopped answering, shared by every thread of the process:
    the wait is reported once when it starts and once when the server answers again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: dict[str, tuple[float, int]] = {}

    def failed(self, server: str, exc: BaseException, report: Callable[[str], None]) -> None:
        """Sleep a little before the caller tries again; raise once the wait is used up."""
        now, wait_s = time.monotonic(), server_wait_s()
        with self._lock:
            since, failures = self._since.get(server, (now, 0))
            self._since[server] = (since, failures + 1)
        # A server that restarted while this process was idle fails a pooled connection once;
        # the retry opens a new one. Only a second failure in a row is worth a word.
        if failures == 1:
            report(f"the history server ({server}) is unreachable: {_unreachable_reason(exc)}; "
                   f"waiting up to {wait_s:.0f}s for it to come back ({HISTORY_WAIT_ENV})")
        waited = now - since
        if waited >= wait_s:
            raise HistoryUnreachableError(
                f"the history server ({server}) did not answer for {waited:.0f}s, longer than the {wait_s:.0f}s "
                f"{HISTORY_WAIT_ENV} allows: {_unreachable_reason(exc)}"
            ) from exc
        time.sleep(min(0.1 * 2 ** min(failures, 4), 1.0, max(wait_s - waited, 0.0)))

    def answered(self, server: str, report: Callable[[str], None]) -> None:
        if server not in self._since:
            return
        with self._lock:
            since, failures = self._since.pop(server, (None, 0))
        if since is not None and failures > 1:
            report(f"the history server ({server}) answers again after {time.monotonic() - since:.0f}s")


_outages = _Outages()


def busy_reason(exc: BaseException) -> str:
    """What holds the history, in words: the holder's PID and command when DuckDB names it."""
    text = str(exc)
    pid = re.search(r"PID (\d+)", text)
    if pid:
        try:
            command = Path(f"/proc/{pid[1]}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            command = ""
        return f"locked by process {pid[1]}" + (f" ({command[:120]})" if command else "")
    if "Transaction conflict" in text or "serialize" in text or "deadlock" in text:
        return "another writer committed a conflicting change first"
    return "another writer holds the catalog"


@contextmanager
def report_waits(callback: Callable[[str], None] | None, server: str | None = None) -> Iterator[None]:
    """Waits on the history inside this block are reported through ``callback`` (a run's log);
    ``server`` names the history's catalog in what is reported (default: kept from an outer block)."""
    tokens = [_wait_reporter.set(callback)]
    if server is not None:
        tokens.append(_history_server.set(server))
    try:
        yield
    finally:
        for token in reversed(tokens):
            token.var.reset(token)


def retry_busy(
    action: Callable[[], T],
    what: str,
    timeout_s: float = 600.0,
    on_wait: Callable[[str], None] | None = None,
    server: str | None = None,
) -> T:
    """Run ``action``, retrying with jittered backoff while the history is busy. A wait longer than
    10 s is reported once, naming what it waits for; past ``timeout_s`` it fails with the reason.
    While the catalog's server is unreachable it is tried again for up to ``LORASUM_HISTORY_WAIT_S``,
    reported once with the server's address; then it fails naming the server."""
    report = on_wait or _wait_reporter.get() or _log.warning
    server = server or _history_server.get() or "the history's catalog"
    start = time.monotonic()
    delay = 0.02
    reported = False
    while True:
        try:
            result = action()
        except Exception as exc:
            if is_unreachable_error(exc):
                _outages.failed(server, exc, report)
                continue
            if not is_busy_error(exc):
                raise
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise DatabaseBusyError(f"{what} stayed busy for {timeout_s:.0f}s: {busy_reason(exc)}") from exc
            if waited >= WAIT_REPORT_AFTER_S and not reported:
                report(f"waiting {waited:.0f}s so far for {what}: {busy_reason(exc)}")
                reported = True
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)
        else:
            _outages.answered(server, report)
            return result


def in_transaction(con, body: Callable[[Any], T], what: str = "a history write", timeout_s: float = 600.0) -> T:
    """``body(con)`` in one transaction, committed or rolled back whole, and run again from the
    start when the commit loses a race to another writer."""

    def attempt() -> T:
        con.execute("BEGIN TRANSACTION")
        try:
            result = body(con)
            con.execute("COMMIT")
        except BaseException:
            with suppress(Exception):
                con.execute("ROLLBACK")
            raise
        return result

    return retry_busy(attempt, what, timeout_s=timeout_s)
