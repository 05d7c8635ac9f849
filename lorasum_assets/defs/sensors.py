"""The sensors: data change, run failures, dead runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from lorasum_assets.defs.jobs import train_and_evaluate
from lorasum_assets.ml.data.dialogues import load_local
from lorasum_assets.ml.data.readers import DataSourceError
from lorasum_assets.runtime.dead_runs import release_dead_runs
from lorasum_assets.settings.env import WATCH_PATH_ENV, get_env
from lorasum_assets.store.writes import record_run_failure


def fingerprint(path: Path) -> str:
    """Changes whenever a file under ``path`` is added, removed, resized or rewritten."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class WatchState:
    """The sensor's cursor: the watched data's fingerprint, and why a run would fail on it."""

    fingerprint: str
    problem: str | None = None

    @classmethod
    def read(cls, cursor: str | None) -> WatchState | None:
        if not cursor:
            return None
        if not cursor.startswith("{"):
            return cls(cursor)  # an older cursor: the fingerprint alone
        return cls(**json.loads(cursor))

    def write(self) -> str:
        return json.dumps({"fingerprint": self.fingerprint, "problem": self.problem})


def unreadable(path: Path) -> str | None:
    """Why ``raw_dialogsum`` would fail on ``path``, read the way it reads it; None when it would not."""
    try:
        loaded = load_local(path)
    except DataSourceError as exc:
        return str(exc)
    if not loaded.dialogues:
        return f"none of its {sum(loaded.rows_in.values())} rows is a usable dialogue"
    return None


@dg.sensor(
    job=train_and_evaluate,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description=f"Retrains when the data under {WATCH_PATH_ENV} changes; fires once per change, and only for "
    "data raw_dialogsum can read (docs/data.md).",
)
def retrain_on_data_change(context: dg.SensorEvaluationContext):
    watched = get_env(WATCH_PATH_ENV)
    if not watched:
        return dg.SkipReason(f"set {WATCH_PATH_ENV} to a data file or folder to watch (docs/data.md)")
    path = Path(watched)
    if not path.exists():
        return dg.SkipReason(f"{path} does not exist")
    current = fingerprint(path)
    seen = WatchState.read(context.cursor)
    if seen and current == seen.fingerprint:
        return dg.SkipReason(f"still not retraining: {seen.problem}" if seen.problem else f"no change in {path}")
    problem = unreadable(path)
    reason = f"raw_dialogsum would fail on {path}: {problem}" if problem else None
    context.update_cursor(WatchState(current, reason).write())  # the data is read once per change
    if reason:
        return dg.SkipReason(f"not retraining: {reason}")
    if seen is None:
        return dg.SkipReason(f"now watching {path} (fingerprint {current})")
    return dg.RunRequest(
        run_key=f"data-{current}",
        run_config={"ops": {"raw_dialogsum": {"config": {"source": "local", "path": str(path)}}}},
        tags={"lorasum/trigger": "data_change", "lorasum/fingerprint": current},
    )


def step_errors(instance: dg.DagsterInstance, run_id: str) -> str:
    """Each failed step's own error, ``step: Type: message``, innermost cause first: the run's
    failure event says only which steps failed."""
    lines = []
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        error = record.dagster_event.event_specific_data.error
        while error is not None and error.cause is not None:
            error = error.cause
        if error is not None:
            lines.append(f"{record.dagster_event.step_key}: {error.message.strip()}")
    return "\n".join(lines)


@dg.run_failure_sensor(
    name="record_run_failures",
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Writes every failed run into the history database (table run_failures).",
)
def record_run_failures(context: dg.RunFailureSensorContext) -> None:
    from lorasum_assets.defs.resources.factory import build_store

    run = context.dagster_run
    message = step_errors(context.instance, run.run_id) or context.failure_event.message or ""
    store = build_store()
    with store.connect() as con:
        record_run_failure(con, run.run_id, run.job_name, message)


@dg.sensor(
    name="release_dead_run_slots",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks runs whose process died as failed and frees their lorasum_gpu slots, so waiting runs go on.",
)
def release_dead_run_slots(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    released = release_dead_runs(context.instance, log=context.log.warning)
    if released:
        return dg.SkipReason(f"released {len(released)} dead run(s): {', '.join(r.run_id for r in released)}")
    return dg.SkipReason("no dead run holds a pool slot")
