"""The IO manager that hands references from an asset to the assets downstream of it.

An asset returns a reference (``store/references.py``); it is stored in the metadata of that
asset's materialization event in Dagster's own event log. A downstream asset receives the
reference of the upstream materialization in its lineage:

1. the one made in this run, if the upstream ran in it;
2. else the one made in the run this run re-executes (its parent, and so on);
3. else the upstream's latest materialization, which is what Dagster means by an unselected
   upstream asset.

Rows are never found as "the newest row" of a shared table: concurrent runs each follow their own.
"""

from __future__ import annotations

import dagster as dg

from lorasum_assets.store.references import AdapterRef, TableRef, reference_from_json, reference_to_json

REFERENCE_KEY = "lorasum/reference"


def lineage_run_ids(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """This run, then the runs it re-executes, nearest first."""
    chain = [run_id]
    run = instance.get_run_by_id(run_id)
    while run is not None and run.parent_run_id and run.parent_run_id not in chain:
        chain.append(run.parent_run_id)
        run = instance.get_run_by_id(run.parent_run_id)
    return chain


def materialization_in_lineage(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, run_id: str
) -> tuple[dg.EventLogEntry | None, bool]:
    """The upstream materialization a run should read, and whether it was made in the run's lineage
    (this run or a run it re-executes) rather than taken as the asset's latest."""
    for candidate in lineage_run_ids(instance, run_id):
        records = instance.get_records_for_run(run_id=candidate, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
        found = [r.event_log_entry for r in records if r.event_log_entry.dagster_event.asset_key == asset_key]
        if found:
            return found[-1], True
    return instance.get_latest_materialization_event(asset_key), False


def reference_of(entry: dg.EventLogEntry | None) -> TableRef | AdapterRef | None:
    if entry is None or entry.asset_materialization is None:
        return None
    value = entry.asset_materialization.metadata.get(REFERENCE_KEY)
    return reference_from_json(value.value) if value is not None else None


def reference_in_lineage(instance: dg.DagsterInstance, asset_key: dg.AssetKey, run_id: str) -> TableRef | AdapterRef | None:
    return reference_of(materialization_in_lineage(instance, asset_key, run_id)[0])


class LineageIOManager(dg.ConfigurableIOManager):
    """Each asset reads exactly what its upstream wrote in this run's lineage (the same run, or the
    run that materialized the upstream for it), never the newest rows someone else wrote."""

    def handle_output(self, context: dg.OutputContext, obj: TableRef | AdapterRef | None) -> None:
        if obj is not None:
            context.add_output_metadata({REFERENCE_KEY: dg.MetadataValue.json(reference_to_json(obj))})

    def load_input(self, context: dg.InputContext) -> TableRef | AdapterRef | None:
        run_id = context.step_context.run_id
        ref = reference_in_lineage(context.instance, context.asset_key, run_id)
        if ref is None:
            context.log.warning(f"{context.asset_key.to_user_string()} has no materialization with a reference yet")
        return ref
