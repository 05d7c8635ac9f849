"""What one asset hands the next: small references to what it materialized. No dagster here.

A reference names the rows an asset wrote (by the run that wrote them) or the adapter it trained,
so a downstream asset reads exactly its own upstream's output, never "the newest row" of a table
that other runs write too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class BaseModelRef:
    """The base model an adapter belongs to."""

    model: str
    revision: str | None
    quantization: str
    fingerprint: str

    def describe(self) -> str:
        return f"{self.model}@{self.revision or 'main'} (fingerprint {self.fingerprint[:12]})"


class AdapterMismatchError(ValueError):
    """An adapter applied to a base model other than the one it was trained on."""


def check_adapter_base(adapter_id: str, trained_on: BaseModelRef, current: BaseModelRef) -> None:
    same = (trained_on.model, trained_on.revision, trained_on.fingerprint) == (current.model, current.revision, current.fingerprint)
    if not same:
        raise AdapterMismatchError(
            f"adapter {adapter_id} was trained on {trained_on.describe()}, but this run's base model is {current.describe()}"
        )


@dataclass(frozen=True, kw_only=True)
class TableRef:
    """Rows one materialization of ``asset`` wrote, keyed by ``run_id`` in the asset's tables."""

    asset: str
    run_id: str
    rows: int
    content_hash: str
    data_version: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AdapterRef:
    """A trained, registered adapter and everything needed to check where it may be applied."""

    adapter_id: str
    path: str
    sha256: str
    base: BaseModelRef
    training: dict[str, Any]
    run_id: str
    data_version: str


def reference_to_json(ref: TableRef | AdapterRef) -> dict[str, Any]:
    return {"kind": type(ref).__name__, **asdict(ref)}


def reference_from_json(payload: dict[str, Any]) -> TableRef | AdapterRef:
    payload = dict(payload)
    kind = payload.pop("kind")
    if kind == "TableRef":
        return TableRef(**payload)
    if kind == "AdapterRef":
        return AdapterRef(**{**payload, "base": BaseModelRef(**payload["base"])})
    raise ValueError(f"unknown reference kind {kind!r}")


def version_of(*parts: Any) -> str:
    """A data version: a short hash of everything that decides an asset's content."""
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
