"""DialogSum normalised to one row per dialogue with a list of references, and the 1/100 filter.

Every source ends up as one row per dialogue with a list of references. Rows that cannot be
used are quarantined with a reason, never dropped: for each split, rows in = kept + quarantined.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorasum_assets.ml.data.readers import (
    AUTHORS_COLUMNS,
    AUTHORS_TEST_COLUMNS,
    HUB_COLUMNS,
    SPLITS,
    DataSourceError,
    RawRecord,
    read_local,
    unicode_problem,
)
from lorasum_assets.settings.specs import FilterSpec


@dataclass(frozen=True)
class Dialogue:
    split: str
    id: str
    dialogue: str
    references: list[str]
    topic: str | None
    source_index: int


@dataclass(frozen=True)
class QuarantinedRow:
    split: str
    row_number: int
    id: str | None
    reason: str
    raw: str
    file: str = ""


@dataclass
class LoadedDataset:
    source: str
    dialogues: list[Dialogue]
    quarantined: list[QuarantinedRow]
    rows_in: dict[str, int]

    def kept_counts(self) -> dict[str, int]:
        return {s: sum(1 for d in self.dialogues if d.split == s) for s in self.rows_in}

    def quarantined_counts(self) -> dict[str, int]:
        return {s: sum(1 for q in self.quarantined if q.split == s) for s in self.rows_in}

    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for d in self.dialogues:
            digest.update(json.dumps(asdict(d), sort_keys=True, ensure_ascii=False).encode())
        return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Normalising and validating


def _layout(columns: set[str], split: str) -> str:
    if {"id", "dialogue", "summary"} <= columns:
        return "hub"
    if {"fname", "dialogue", "summary1"} <= columns:
        return "authors-test"
    if {"fname", "dialogue", "summary"} <= columns:
        return "authors"
    if split == "test" and {"id", "dialogue"} <= columns:
        return "hub"
    raise DataSourceError(
        f"split {split!r}: wrong columns; expected {list(HUB_COLUMNS)} (hub layout) or "
        f"{list(AUTHORS_COLUMNS)} / {list(AUTHORS_TEST_COLUMNS)} (authors' release), found {sorted(columns)}"
    )


def _raw_text(record: RawRecord) -> str:
    try:
        text = json.dumps(record.values, ensure_ascii=False, default=str)[:2000]
    except (TypeError, ValueError, RecursionError):
        text = repr(record.values)[:2000]
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # storable even with lone surrogates


def _string_field(values: dict[str, Any], name: str) -> tuple[str | None, str | None]:
    """The field as a string, or a quarantine reason."""
    value = values.get(name)
    if value is None:
        return None, None
    if isinstance(value, float) and value != value:  # NaN from pandas-style readers
        return None, None
    if not isinstance(value, str):
        return None, f"non_string_field: {name} is {type(value).__name__}"
    if problem := unicode_problem(value):
        return None, f"invalid_unicode: {name}: {problem}"
    return value, None


def _fold_key(record: RawRecord) -> str | None:
    dialogue = record.values.get("dialogue")
    return dialogue.strip() if isinstance(dialogue, str) else None


def _base_id(ids: list[str]) -> str:
    """``test_0_1, test_0_2, test_0_3`` fold back to ``test_0``."""
    stripped = {re.sub(r"_\d+$", "", i) for i in ids}
    return stripped.pop() if len(stripped) == 1 and len(ids) > 1 else ids[0]


def normalise(by_split: dict[str, list[RawRecord]], source: str) -> LoadedDataset:
    """One row per dialogue with its references, every row that cannot be one quarantined with
    its reason: rows in = rows kept + rows quarantined, per split."""
    dialogues: list[Dialogue] = []
    quarantined: list[QuarantinedRow] = []
    rows_in: dict[str, int] = {}
    for split, records in by_split.items():
        rows_in[split] = len(records)
        readable = [r for r in records if r.read_error is None]
        for record in records:
            if record.read_error is not None:
                quarantined.append(QuarantinedRow(split, record.row_number, None, record.read_error, _raw_text(record), record.file))
        if not readable:
            continue
        layout = _layout(set().union(*(r.values.keys() for r in readable)), split)
        seen_ids: set[str] = set()
        for source_index, members in enumerate(_dialogue_groups(readable, layout, split)):
            row_id, dialogue, references, topic, reason = _read_group(members, layout, split, seen_ids)
            if reason is not None:
                for member in members:
                    quarantined.append(QuarantinedRow(split, member.row_number, row_id, reason, _raw_text(member), member.file))
                continue
            seen_ids.add(row_id)
            dialogues.append(Dialogue(split, row_id, dialogue.strip(), references, topic, source_index))
    return LoadedDataset(source=source, dialogues=dialogues, quarantined=quarantined, rows_in=rows_in)


def load_local(path: str | Path) -> LoadedDataset:
    """A local file or folder as ``raw_dialogsum`` reads it (the data-change sensor checks with this)."""
    return normalise(read_local(path), f"local:{path}")


def _dialogue_groups(readable: list[RawRecord], layout: str, split: str) -> list[list[RawRecord]]:
    """The rows of each dialogue, in first-seen order: the hub repeats each test dialogue once per reference."""
    groups: dict[str, list[RawRecord]] = {}
    order: list[list[RawRecord]] = []
    for record in readable:
        key = _fold_key(record) if layout == "hub" and split == "test" else None
        if key:
            if key not in groups:
                groups[key] = []
                order.append(groups[key])
            groups[key].append(record)
        else:
            order.append([record])
    return order


def _read_group(members: list[RawRecord], layout: str, split: str, seen_ids: set[str]):
    """(id, dialogue, references, topic, reason) of one dialogue's rows; reason is None when it is usable."""
    id_field = "id" if layout == "hub" else "fname"
    values = members[0].values
    reason = None
    raw_ids = []
    for member in members:
        value, problem = _string_field(member.values, id_field)
        reason = reason or problem
        if value is not None:
            raw_ids.append(value.strip())
    dialogue, problem = _string_field(values, "dialogue")
    reason = reason or problem
    if layout == "authors-test":
        ref_fields = sorted((c for c in values if re.fullmatch(r"summary\d+", c)), key=lambda c: int(c[7:]))
    else:
        ref_fields = ["summary"]
    references: list[str] = []
    for member in members:
        for name in ref_fields:
            value, problem = _string_field(member.values, name)
            reason = reason or problem
            if value is not None and value.strip():
                references.append(value.strip())
    topic, problem = _string_field(values, "topic" if "topic" in values else "topic1")
    reason = reason or problem
    row_id = _base_id(raw_ids) if raw_ids else None
    if reason is None:
        if not row_id:
            reason = f"missing_id: {id_field} is empty"
        elif dialogue is None or dialogue == "":
            reason = "empty_dialogue"
        elif not dialogue.strip():
            reason = "whitespace_dialogue"
        elif not references and split in ("train", "validation"):
            reason = "missing_summary"
        elif not references:
            reason = "missing_reference"
        elif row_id in seen_ids:
            reason = f"duplicate_id: {row_id} appears earlier in {split}"
    return row_id, dialogue, references, topic, reason


# ----------------------------------------------------------------------------------------------
# The notebook's 1/100 filter



def filter_split(dialogues: Iterable[Dialogue], spec: FilterSpec) -> list[Dialogue]:
    """Per split, keep rows whose index in the split satisfies ``index % modulus == offset``.

    With ``random_sample`` set, a seeded sample of that many rows per split replaces the modulus rule.
    """
    if spec.modulus < 1 or not 0 <= spec.offset < spec.modulus:
        raise ValueError(f"need modulus >= 1 and 0 <= offset < modulus, got {spec.modulus}, {spec.offset}")
    by_split: dict[str, list[Dialogue]] = {}
    for d in dialogues:
        by_split.setdefault(d.split, []).append(d)
    kept: list[Dialogue] = []
    for split in sorted(by_split, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s)):
        rows = sorted(by_split[split], key=lambda d: d.source_index)
        if spec.random_sample is not None:
            rng = random.Random(f"{spec.seed}:{split}")
            chosen = rng.sample(rows, min(spec.random_sample, len(rows)))
            rows = sorted(chosen, key=lambda d: d.source_index)
        else:
            rows = [d for d in rows if d.source_index % spec.modulus == spec.offset]
        if spec.max_rows_per_split is not None:
            rows = rows[: spec.max_rows_per_split]
        kept.extend(rows)
    return kept
