"""Lineage: each asset reads what its own upstream materialization wrote; adapters fit their base;
changed code, settings or models show as unsynced."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from lorasum_assets.defs.assets import ALL_ASSETS
from lorasum_assets.defs.checks import ALL_CHECKS
from lorasum_assets.defs.resources.factory import build_resources
from lorasum_assets.settings.profiles import get_profile
from lorasum_assets_tests.helpers import error_text, history_of

REPO = Path(__file__).resolve().parents[1]
EVALUATION = dg.AssetSelection.assets("base_predictions", "tuned_predictions", "bertscore_report")
STALENESS = """
import json, dagster as dg
from dagster._core.definitions.data_version import CachingStaleStatusResolver
from dagster._core.loader import LoadingContextForTest
from lorasum_assets.definitions import defs
with dg.DagsterInstance.get() as instance:
    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    keys = [k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()]
    print(json.dumps({k: resolver.get_status(dg.AssetKey(k)).value for k in keys}))
"""


def materialize(instance, selection="*", run_config=None, raise_on_error=True):
    return dg.materialize(
        [*ALL_ASSETS, *ALL_CHECKS], resources=build_resources(get_profile("tiny")), instance=instance,
        selection=selection, run_config=run_config, raise_on_error=raise_on_error,
    )


def stale_statuses(dagster_home: Path, profile: str) -> dict[str, str]:
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "LORASUM_PROFILE": profile}
    proc = subprocess.run([sys.executable, "-c", STALENESS], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_asset_reads_its_own_upstream_materialization_not_the_newest_rows(fresh_home):
    ours, theirs = dg.DagsterInstance.ephemeral(), dg.DagsterInstance.ephemeral()
    first = materialize(ours, "*filtered_split")  # 64 dialogues kept
    # another deployment writes newer filtered_split rows into the same database (every other dialogue)
    assert materialize(theirs, "*filtered_split", {"ops": {"filtered_split": {"config": {"modulus": 2}}}}).success
    result = materialize(ours, "tokenized_dataset")
    ref = result.asset_materializations_for_node("tokenized_dataset")[0].metadata["lorasum/reference"].value
    con = history_of(fresh_home)
    ours_split = con.execute("SELECT count(*) FROM filtered_split_by_run WHERE run_id = ? AND split IN ('train', 'validation')",
                             [first.run_id]).fetchone()[0]
    assert ref["rows"] == con.execute("SELECT count(*) FROM tokenized_dataset_by_run WHERE run_id = ?", [result.run_id]).fetchone()[0]
    assert ref["rows"] == ours_split == 52  # not the 26 the newest filtered_split rows hold
    # the current views show each asset's newest materialization
    assert con.execute("SELECT count(*) FROM filtered_split").fetchone()[0] == 32
    assert con.execute("SELECT count(*) FROM tokenized_dataset").fetchone()[0] == 52


def test_an_adapter_refuses_a_different_base_model_before_any_generation(fresh_home, tmp_path):
    from lorasum_assets.ml.models.tiny import build_tiny_model

    instance = dg.DagsterInstance.ephemeral()
    result = materialize(instance, "*lora_adapter")
    adapter = result.asset_materializations_for_node("lora_adapter")[0].metadata["lorasum/reference"].value
    other_base = build_tiny_model(tmp_path / "other-tiny", seed=1)  # same architecture, other weights

    def evaluate(adapter_id=None):
        ops = {"tuned_predictions": {"config": {"adapter_id": adapter_id}}} if adapter_id else {}
        config = {"ops": ops, "resources": {"model": {"config": {"model": str(other_base)}}}}
        return materialize(instance, EVALUATION, config, raise_on_error=False)

    failed = evaluate(adapter["adapter_id"])
    message = error_text(failed)
    assert not failed.success
    line = next(line for line in message.splitlines() if "was trained on" in line)
    assert f"adapter {adapter['adapter_id']} was trained on builtin:tiny-llama@main (fingerprint {adapter['base']['fingerprint'][:12]})" in line
    assert f"this run's base model is {other_base}@main (fingerprint" in line
    assert not [e for e in failed.all_events if e.event_type == dg.DagsterEventType.STEP_START]  # nothing generated

    # with no adapter named, or `auto` as the Launchpad shows it, the default is the newest adapter
    # trained on the run's base: there is none
    assert "no registered adapter was trained on" in error_text(evaluate())
    assert "no registered adapter was trained on" in error_text(evaluate("auto"))
    # on the base it was trained on, the same adapter evaluates
    ok = materialize(instance, EVALUATION,
                     {"ops": {"tuned_predictions": {"config": {"adapter_id": adapter["adapter_id"]}}}})
    assert ok.asset_materializations_for_node("tuned_predictions")[0].metadata["adapter_id"].value == adapter["adapter_id"]


@pytest.mark.slow  # five materializations in processes of their own: 19 s
def test_changed_settings_show_as_unsynced_and_the_loading_profile_does_not(fresh_home, tmp_path):
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    from lorasum_assets.definitions import defs

    home = tmp_path / "dagster"
    home.mkdir()
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        assert materialize(instance).success
        graph = defs.resolve_asset_graph()

        def statuses():
            resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
            return {k.to_user_string(): resolver.get_status(k).value for k in graph.get_all_asset_keys()}

        assert set(statuses().values()) == {"FRESH"}
        # one training knob changed in a run: the adapter's data version changes, its downstream is unsynced
        assert materialize(instance, "lora_adapter", {"ops": {"lora_adapter": {"config": {"learning_rate": 1e-3}}}}).success
        after_knob = statuses()
        assert after_knob["tuned_predictions"] == "STALE"
        assert after_knob["lora_adapter"] == after_knob["base_predictions"] == "FRESH"
        # Dagster marks the direct downstream; the report follows once tuned_predictions has a new version
        assert materialize(instance, "tuned_predictions").success
        after_tuned = statuses()
        assert after_tuned["tuned_predictions"] == "FRESH" and after_tuned["bertscore_report"] == "STALE"
    # The profile is read when a run starts: definitions loaded under another LORASUM_PROFILE have
    # the same code versions, so no asset's status changes by that alone.
    assert stale_statuses(home, "smollm2-135m") == stale_statuses(home, "tiny") == after_tuned


def test_runs_carry_tags_for_profile_base_model_adapter_and_dataset(fresh_home):
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(instance)
    tags = instance.get_run_by_id(result.run_id).tags
    adapter_id = result.asset_materializations_for_node("lora_adapter")[0].metadata["adapter_id"].value
    assert tags["lorasum/profile"] == "tiny" and tags["lorasum/base_model"] == "builtin:tiny-llama"
    assert tags["lorasum/adapter_id"] == adapter_id
    assert len(tags["lorasum/dataset_hash"]) == 16


@pytest.mark.parametrize("module", ["lorasum_assets.defs.assets.training", "lorasum_assets.defs.assets.predictions"])
def test_code_versions_come_from_the_source(module):
    from lorasum_assets.settings.versions import module_closure

    closure = module_closure(module)
    assert "lorasum_assets.settings.specs" in closure and module in closure
    assert "lorasum_assets.settings.profiles" not in closure  # settings enter as values, not as profiles.py's source
