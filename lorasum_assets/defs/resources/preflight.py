"""Checks made when a run starts, before any step waits for the GPU pool or generates anything."""


import dagster as dg

from lorasum_assets.defs.resources.model import LoraModelResource
from lorasum_assets.defs.resources.store import LorasumStore
from lorasum_assets.runtime.dead_runs import release_dead_runs
from lorasum_assets.settings.specs import PRODUCTION_ALIAS
from lorasum_assets.store.aliases import holders
from lorasum_assets.store.registry import choose_adapter, find_adapter

# Jobs whose runs train no adapter of their own; every other run materializes lora_adapter itself
# unless its asset selection leaves it out.
EVALUATION_ONLY_JOBS = {"evaluate"}


def _config_adapter_id(run: dg.DagsterRun) -> str | None:
    ops = (run.run_config or {}).get("ops", {})
    return ((ops.get("tuned_predictions") or {}).get("config") or {}).get("adapter_id")


def evaluates_an_existing_adapter(run: dg.DagsterRun) -> bool:
    """True when the run materializes tuned_predictions but not lora_adapter."""
    if run.step_keys_to_execute:
        keys = set(run.step_keys_to_execute)
    elif run.asset_selection:
        keys = {key.to_user_string() for key in run.asset_selection}
    else:
        return run.job_name in EVALUATION_ONLY_JOBS
    return "tuned_predictions" in keys and "lora_adapter" not in keys


class RunPreflightResource(dg.ConfigurableResource):
    """Checks made when a run starts, before its GPU steps wait for a slot:

    - frees the ``lorasum_gpu`` pool slots of earlier runs whose process died (killed, or out of
      memory), so this run does not wait for them forever;
    - in a run that evaluates an existing adapter, checks that the adapter exists and fits the
      run's base model, before any generation starts.
    """

    model: LoraModelResource
    store: LorasumStore
    release_dead_runs: bool = True

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        run = context.run
        if context.instance is None or run is None:
            return
        if self.release_dead_runs:
            released = release_dead_runs(context.instance, exclude_run_id=run.run_id)
            if released and context.log is not None:
                context.log.warning(f"freed the pool slots of {len(released)} dead run(s): {', '.join(r.run_id for r in released)}")
        if evaluates_an_existing_adapter(run):
            base = self.model.base_ref()
            with self.store.connect() as con:
                held = holders(con, PRODUCTION_ALIAS, base.model)
                production = find_adapter(con, held[0][2]) if held else None
                adapter = choose_adapter(con, base, _config_adapter_id(run), None, production)
            if context.log is not None:
                context.log.info(f"this run evaluates adapter {adapter.adapter_id}")
