"""Adapters trained and saved but not yet in the registry, because the history could not be
written when training ended. Each waits as a JSON file under ``$LORASUM_HOME/pending`` until its
run, or ``lorasum recover``, records it."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lorasum_assets.ml.models.adapter_files import AdapterFilesError, verify_adapter_files
from lorasum_assets.ml.training.records import StepLog
from lorasum_assets.runtime.home import home_subdir
from lorasum_assets.store.writes import record_training_log, register_adapter

FOLDER = "pending"


@dataclass(frozen=True)
class PendingRegistration:
    """An adapter's registry row and its run's training log, as the history will hold them."""

    adapter: dict[str, Any]
    steps: list[StepLog]
    epochs: list[tuple[int, float | None]]

    @property
    def adapter_id(self) -> str:
        return self.adapter["adapter_id"]

    def to_json(self) -> str:
        adapter = {**self.adapter, "created_at": self.adapter["created_at"].isoformat()}
        return json.dumps({"adapter": adapter, "steps": [asdict(s) for s in self.steps], "epochs": self.epochs}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> PendingRegistration:
        data = json.loads(text)
        adapter = {**data["adapter"], "created_at": datetime.fromisoformat(data["adapter"]["created_at"])}
        return cls(adapter, [StepLog(**s) for s in data["steps"]], [(e, v) for e, v in data["epochs"]])


def write_pending(registration: PendingRegistration) -> Path:
    """Kept on disk (written whole, then renamed into place) until the history holds it."""
    folder = home_subdir(FOLDER)
    path = folder / f"{registration.adapter_id}.json"
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=folder)
    with os.fdopen(handle, "w") as out:
        out.write(registration.to_json())
    os.replace(staging, path)
    return path


def record_registration(con, registration: PendingRegistration) -> None:
    """The run's whole training log, then the adapter's row; both replace what an earlier try wrote."""
    adapter = registration.adapter
    record_training_log(con, adapter["train_key"], adapter["run_id"], steps=registration.steps,
                        epochs=registration.epochs, replace_all=True)
    register_adapter(con, adapter)


def pending_registrations() -> list[tuple[Path, PendingRegistration]]:
    return [(path, PendingRegistration.from_json(path.read_text())) for path in sorted(home_subdir(FOLDER).glob("*.json"))]


def register_pending(con) -> list[tuple[str, str, int, str]]:
    """Records every pending adapter whose files are intact: (adapter id, run id, steps, outcome).
    A damaged or missing adapter is left pending and reported, never registered."""
    outcomes = []
    for path, registration in pending_registrations():
        adapter = registration.adapter
        try:
            verify_adapter_files(registration.adapter_id, adapter["path"], adapter["sha256"])
        except (AdapterFilesError, FileNotFoundError) as exc:
            outcomes.append((registration.adapter_id, adapter["run_id"], len(registration.steps), f"not registered: {exc}"))
            continue
        record_registration(con, registration)
        path.unlink()
        outcomes.append((registration.adapter_id, adapter["run_id"], len(registration.steps), "registered"))
    return outcomes
