"""Reading DialogSum: the hub, local files in either published layout, or the bundled sample.

Every reader returns raw records, one per row as read; a row that cannot be read at all becomes a
record with its ``read_error`` (and later a quarantined row), never an exception, unless the whole
file is unusable.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from lorasum_assets.settings.specs import HUB_DATASET_ID

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "dev": "validation", "validation": "validation", "val": "validation", "test": "test"}
HUB_COLUMNS = ("id", "dialogue", "summary", "topic")
AUTHORS_COLUMNS = ("fname", "dialogue", "summary", "topic")
AUTHORS_TEST_COLUMNS = ("fname", "dialogue", "summary1", "summary2", "summary3")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

class DataSourceError(ValueError):
    """A source that cannot be read at all (as opposed to single bad rows, which are quarantined)."""



@dataclass
class RawRecord:
    """One row as read, before validation. ``values`` holds whatever the file had."""

    split: str
    row_number: int
    values: dict[str, Any] = field(default_factory=dict)
    read_error: str | None = None
    file: str = ""



# ----------------------------------------------------------------------------------------------
# Reading


MAX_ROW_BYTES = 8 * 1024 * 1024  # a DialogSum row is a few kB; anything this large is not a dialogue
BOM = b"\xef\xbb\xbf"


def unicode_problem(value: Any, depth: int = 0) -> str | None:
    """Where ``value`` holds a string that is not valid Unicode (a lone surrogate from a JSON
    escape such as "\\ud800"), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"lone surrogate at character {exc.start}"
        return None
    if depth > 100:
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        problem = unicode_problem(item, depth + 1)
        if problem:
            return f"{key}: {problem}"
    return None


def _parse_json_line(raw_line: bytes, split: str, number: int) -> RawRecord:
    if len(raw_line) > MAX_ROW_BYTES:
        return RawRecord(split, number, {}, f"oversize_row: {len(raw_line):,} bytes (limit {MAX_ROW_BYTES:,})")
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRecord(split, number, {}, f"invalid_utf8: {exc.reason} at byte {exc.start}")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return RawRecord(split, number, {"_line": line[:200]}, f"invalid_json: {exc.msg}")
    except RecursionError:
        return RawRecord(split, number, {"_line": line[:200]}, "too_deeply_nested: the JSON value nests deeper than the parser allows")
    if not isinstance(value, dict):
        return RawRecord(split, number, {"_line": line[:200]}, "invalid_json: not an object")
    problem = unicode_problem(value)
    if problem:
        return RawRecord(split, number, {"_line": line[:200]}, f"invalid_unicode: {problem}")
    return RawRecord(split, number, value)


def _read_jsonl(path: Path, split: str) -> list[RawRecord]:
    records = []
    with path.open("rb") as handle:
        for number, raw_line in enumerate(handle, start=1):
            if number == 1 and raw_line.startswith(BOM):
                raw_line = raw_line[len(BOM) :]
            if raw_line.strip():
                records.append(_parse_json_line(raw_line, split, number))
    return records


def _read_json(path: Path, split: str) -> list[RawRecord]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path}: not valid UTF-8 at byte {exc.start}") from exc
    except RecursionError as exc:
        raise DataSourceError(f"{path}: the JSON value nests deeper than the parser allows") from exc
    except json.JSONDecodeError:
        return _read_jsonl(path, split)  # many ".json" DialogSum files are really JSON lines
    if isinstance(value, dict) and "data" in value:
        value = value["data"]
    if not isinstance(value, list):
        raise DataSourceError(f"{path}: expected a list of objects")
    records = []
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            records.append(RawRecord(split, number, {"_value": repr(item)[:200]}, "invalid_json: not an object"))
        elif problem := unicode_problem(item):
            records.append(RawRecord(split, number, {}, f"invalid_unicode: {problem}"))
        else:
            records.append(RawRecord(split, number, item))
    return records


def _read_csv(path: Path, split: str) -> list[RawRecord]:
    data = path.read_bytes()
    records = []
    lines = data.split(b"\n")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Keep the readable rows and quarantine the rest, by physical line.
        good = []
        for number, line in enumerate(lines, start=1):
            try:
                good.append(line.decode("utf-8-sig"))
            except UnicodeDecodeError as exc:
                if number == 1:
                    raise DataSourceError(f"{path}: header is not valid UTF-8") from exc
                records.append(RawRecord(split, number, {}, f"invalid_utf8: {exc.reason} at byte {exc.start}"))
        text = "\n".join(good)
    reader = csv.DictReader(io.StringIO(text))
    for number, row in enumerate(reader, start=2):
        records.append(RawRecord(split, number, {k: (v if v != "" else None) for k, v in row.items() if k is not None}))
    return records


def _read_parquet(path: Path, split: str) -> list[RawRecord]:
    table = pq.read_table(path)
    return [RawRecord(split, i, row) for i, row in enumerate(table.to_pylist(), start=1)]


READERS: dict[str, Callable[[Path, str], list[RawRecord]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def split_of_file(path: Path) -> str | None:
    tokens = re.split(r"[^a-z]+", path.stem.lower())
    for token in reversed(tokens):
        if token in SPLIT_ALIASES:
            return SPLIT_ALIASES[token]
    return None


def read_local(path: str | Path) -> dict[str, list[RawRecord]]:
    """One data file, or a folder of them; docs/data.md lists the layouts.

    Each file takes its split from its name (``train``, ``dev``/``validation``/``val``, ``test`` as a
    word of it), else from a ``split`` column on every row. In a folder, files of other types are
    ignored.
    """
    path = Path(path)
    if not path.exists():
        raise DataSourceError(f"data path {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DataSourceError(f"{path}: no data files in the folder (expected {', '.join(FILE_SUFFIXES)})")
    by_split: dict[str, list[RawRecord]] = {}
    for file in files:
        for record in _read_file(file):
            by_split.setdefault(record.split, []).append(record)
    return by_split


def _read_file(file: Path) -> list[RawRecord]:
    suffix = file.suffix.lower()
    if suffix not in READERS:
        raise DataSourceError(f"{file}: unsupported file type {file.suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    if file.stat().st_size == 0:
        raise DataSourceError(f"{file}: the file is empty")
    split = split_of_file(file)
    records = READERS[suffix](file, split or "")
    if not records:
        raise DataSourceError(f"{file}: the file has no rows")
    if all(r.read_error is not None for r in records):
        raise DataSourceError(
            f"{file}: none of its {len(records)} rows could be read (row {records[0].row_number}: {records[0].read_error}); "
            f"is it really a {suffix} file?"
        )
    for record in records:
        record.file = file.name
        if split is None:
            record.split = SPLIT_ALIASES.get(str(record.values.get("split", "")).lower(), "")
    missing = sum(1 for r in records if not r.split)
    if missing:
        raise DataSourceError(
            f"{file}: cannot tell the split: name the file after it (train/dev/validation/test) "
            f"or give a 'split' column ({missing} rows without one)"
        )
    return records


def read_sample() -> dict[str, list[RawRecord]]:
    """The dialogues written for this project, shipped with the package."""
    text = resources.files("lorasum_assets").joinpath("sample_data/dialogues.jsonl").read_bytes()
    by_split: dict[str, list[RawRecord]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        value = json.loads(line)
        split = value.pop("split")
        by_split.setdefault(split, []).append(RawRecord(split, number, value))
    return by_split


def read_hub(
    dataset_id: str = HUB_DATASET_ID,
    revision: str | None = None,
    token: str | None = None,
    load_dataset: Callable[..., Any] | None = None,
) -> dict[str, list[RawRecord]]:
    """The real hub path: ``datasets.load_dataset`` with a pinned revision when given."""
    if load_dataset is None:
        # Imported here: `datasets` takes seconds to import and only the hub source needs it.
        from datasets import load_dataset
    dataset = load_dataset(dataset_id, revision=revision, token=token)
    by_split: dict[str, list[RawRecord]] = {}
    for name in dataset:
        split = SPLIT_ALIASES.get(name, name)
        by_split[split] = [RawRecord(split, i, dict(row)) for i, row in enumerate(dataset[name], start=1)]
    return by_split


