"""The jobs: the whole graph, re-scoring an adapter, and one point of a sweep."""

import dagster as dg

from lorasum_assets.runtime.deployment import run_tags

train_and_evaluate = dg.define_asset_job(
    "train_and_evaluate",
    selection=dg.AssetSelection.all(),
    description="Start here: the whole graph, from the data through training and both models' summaries to the report and the promotion gate.",
    tags=run_tags(),
)

evaluate = dg.define_asset_job(
    "evaluate",
    selection=dg.AssetSelection.assets("base_predictions", "tuned_predictions", "bertscore_report"),
    description=(
        "After a first train_and_evaluate run: re-score an existing adapter. Materialize all ▾ → Open launchpad, and set "
        "ops.tuned_predictions.config.adapter_id to its id (auto: the production adapter of the run's base model and dataset, "
        "else the newest adapter trained on it). The adapter is checked when the run starts, before any generation. "
        "Promotes nothing."
    ),
    tags=run_tags(),
)

sweep_point = dg.define_asset_job(
    "sweep_point",
    selection=dg.AssetSelection.assets("lora_adapter", "tuned_predictions", "bertscore_report", "promoted_adapter"),
    description=(
        "Launched by `lorasum sweep GRID.yaml`, one run per point of the grid: trains with its run config, scores its own adapter and "
        "puts it through the promotion gate; "
        "the data and the base predictions come from their latest materializations."
    ),
    tags=run_tags(),
)
