"""The sensors: data change, run failures, dead runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dagster as dg

from lorasum_assets.defs.jobs import train_and_evaluate
from lorasum_assets.runtime.dead_runs import release_dead_runs
from lorasum_assets.settings.env import WATCH_PATH_ENV, get_env
from lorasum_assets.store.history import record_run_failure


def fingerprint(path: Path) -> str:
    """Changes whenever a file under ``path`` is added, removed, resized or rewritten."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@dg.sensor(
    job=train_and_evaluate,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description=f"Retrains when the data under {WATCH_PATH_ENV} changes; fires once per change.",
)
def retrain_on_data_change(context: dg.SensorEvaluationContext):
    watched = get_env(WATCH_PATH_ENV)
    if not watched:
        return dg.SkipReason(f"set {WATCH_PATH_ENV} to a data file or folder to watch")
    path = Path(watched)
    if not path.exists():
        return dg.SkipReason(f"{path} does not exist")
    current = fingerprint(path)
    if context.cursor is None:
        context.update_cursor(current)
        return dg.SkipReason(f"now watching {path} (fingerprint {current})")
    if current == context.cursor:
        return dg.SkipReason(f"no change in {path}")
    context.update_cursor(current)
    return dg.RunRequest(
        run_key=f"data-{current}",
        run_config={"ops": {"raw_dialogsum": {"config": {"source": "local", "path": str(path)}}}},
        tags={"lorasum/trigger": "data_change", "lorasum/fingerprint": current},
    )


@dg.run_failure_sensor(
    name="record_run_failures",
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Writes every failed run into the history database (table run_failures).",
)
def record_run_failures(context: dg.RunFailureSensorContext) -> None:
    from lorasum_assets.defs.resources.factory import build_store

    run = context.dagster_run
    message = context.failure_event.message or ""
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
