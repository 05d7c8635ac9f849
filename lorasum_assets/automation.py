"""Jobs (and, later, schedules and sensors)."""

from __future__ import annotations

import dagster as dg

train_and_evaluate = dg.define_asset_job(
    "train_and_evaluate",
    selection=dg.AssetSelection.all(),
    description="The whole graph: data, training, predictions and the report.",
)
