# ruff: noqa: E402 - the noise filters go in before dagster and the rest are imported
"""Assembles the code location: assets, checks, resources and jobs. Nothing else happens here,
except hiding the libraries' known noise first: every Dagster process starts by loading this."""

from lorasum_assets.runtime.quiet import quiet_known_noise

quiet_known_noise()

import dagster as dg

from lorasum_assets.defs.assets import ALL_ASSETS
from lorasum_assets.defs.checks import ALL_CHECKS
from lorasum_assets.defs.jobs import evaluate, sweep_point, train_and_evaluate
from lorasum_assets.defs.resources.factory import build_resources
from lorasum_assets.defs.schedules import build_retrain_schedule
from lorasum_assets.defs.sensors import record_run_failures, release_dead_run_slots, retrain_on_data_change
from lorasum_assets.runtime.deployment import build_executor

defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[train_and_evaluate, evaluate, sweep_point],
    schedules=[build_retrain_schedule()],
    sensors=[retrain_on_data_change, record_run_failures, release_dead_run_slots],
    resources=build_resources(),
    executor=build_executor(),
)
