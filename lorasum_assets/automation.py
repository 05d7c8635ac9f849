"""Jobs, the retraining schedule, and the sensors: data change, run failures, dead runs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import dagster as dg

from lorasum_assets.deployment import run_tags
from lorasum_assets.recovery import release_dead_runs
from lorasum_assets.store.history import record_run_failure

RETRAIN_CRON_ENV = "LORASUM_RETRAIN_CRON"
DEFAULT_RETRAIN_CRON = "0 3 * * 1"  # weekly, Monday 03:00
WATCH_PATH_ENV = "LORASUM_WATCH_PATH"

train_and_evaluate = dg.define_asset_job(
    "train_and_evaluate",
    selection=dg.AssetSelection.all(),
    description="The whole graph: data, training, predictions, the report and the promotion gate.",
    tags=run_tags(),
)

evaluate = dg.define_asset_job(
    "evaluate",
    selection=dg.AssetSelection.assets("base_predictions", "tuned_predictions", "bertscore_report"),
    description=(
        "Re-score an existing adapter: set ops.tuned_predictions.config.adapter_id (default: the production adapter of "
        "the run's base model and dataset, else the newest adapter trained on it). The adapter is checked when the run "
        "starts, before any generation. Promotes nothing."
    ),
    tags=run_tags(),
)

sweep_point = dg.define_asset_job(
    "sweep_point",
    selection=dg.AssetSelection.assets("lora_adapter", "tuned_predictions", "bertscore_report", "promoted_adapter"),
    description=(
        "One point of a sweep (`lorasum sweep GRID.yaml`): trains with its run config, scores its own adapter and "
        "puts it through the promotion gate; "
        "the data and the base predictions come from their latest materializations."
    ),
    tags=run_tags(),
)


class InvalidCronError(ValueError):
    pass


def retrain_cron() -> str:
    from dagster._utils.schedules import is_valid_cron_string

    cron = os.environ.get(RETRAIN_CRON_ENV) or DEFAULT_RETRAIN_CRON
    if not is_valid_cron_string(cron):
        raise InvalidCronError(f"{RETRAIN_CRON_ENV}={cron!r} is not a valid cron expression (e.g. {DEFAULT_RETRAIN_CRON!r})")
    return cron


def build_retrain_schedule() -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="weekly_retrain",
        job=train_and_evaluate,
        cron_schedule=retrain_cron(),
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Retrains and re-evaluates on a cron ({RETRAIN_CRON_ENV}, weekly by default). Off until turned on.",
    )


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
    watched = os.environ.get(WATCH_PATH_ENV)
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
    from lorasum_assets.resources.factory import build_store

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
