"""The retraining schedule, on a cron from the environment."""

from __future__ import annotations

import dagster as dg

from lorasum_assets.defs.jobs import train_and_evaluate
from lorasum_assets.settings.env import RETRAIN_CRON_ENV, get_env

DEFAULT_RETRAIN_CRON = "0 3 * * 1"  # weekly, Monday 03:00


class InvalidCronError(ValueError):
    pass


def retrain_cron() -> str:
    from dagster._utils.schedules import is_valid_cron_string

    cron = get_env(RETRAIN_CRON_ENV, DEFAULT_RETRAIN_CRON)
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
