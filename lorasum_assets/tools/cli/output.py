"""What every command shares: the history opened read-only with its messages, run ids from a
prefix, and output as an aligned table or JSON (``--json``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Protocol

from lorasum_assets.runtime.text import text_table
from lorasum_assets.store import queries
from lorasum_assets.store.lake import HistoryNotFoundError, HistorySettingError, open_history


class AddCommand(Protocol):
    """Adds a subcommand: ``--json`` and ``-v`` come with it unless ``common`` is False."""

    def __call__(self, name: str, help_text: str, func: Callable[[argparse.Namespace], int],
                 common: bool = True) -> argparse.ArgumentParser: ...


def connect(args: argparse.Namespace):
    try:
        return open_history(read_only=True)
    except (HistoryNotFoundError, HistorySettingError) as exc:
        raise SystemExit(str(exc)) from exc


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print(text_table(header, rows))


def emit(args: argparse.Namespace, header: Sequence[str], rows: Sequence[Sequence[object]], extra: dict | None = None) -> None:
    if args.json:
        payload = {**(extra or {}), "rows": [dict(zip(header, r)) for r in rows]}
        print(json.dumps(payload, indent=2, default=str))
    else:
        print_table(header, rows)


def resolve_run(con, given: str) -> str:
    """A full run id from a unique prefix of one (the UI shows the first 8 characters)."""
    if not given or not given.isprintable() or not given.isascii():
        # Also what the shell hands over for bytes that are not UTF-8 (surrogate escapes DuckDB cannot take).
        raise SystemExit(f"no evaluation run {given!r}: a run id is a Dagster run id or a prefix of one")
    matches = queries.evaluation_ids_starting(con, given)
    if given in matches:
        return given
    if not matches:
        raise SystemExit(f"no evaluation run {given!r}")
    if len(matches) > 1:
        raise SystemExit(f"run id prefix {given!r} matches {len(matches)} runs ({', '.join(m[:12] for m in matches[:5])}); give more characters")
    return matches[0]


def latest_run(con) -> str:
    run_id = queries.latest_evaluation(con)
    if run_id is None:
        raise SystemExit("no evaluation runs yet")
    return run_id
