from lorasum_assets.defs.checks import compare_with_previous_best
from lorasum_assets.store import open_history
from lorasum_assets_tests.helpers import seed_run


def run_check(run_id):
    """The regression check's verdict on ``run_id``: each run is checked against the runs before it."""
    con = open_history()
    try:
        passed, metadata = compare_with_previous_best(con, run_id, "bertscore_f1")
    finally:
        con.close()
    return passed, metadata


def test_regression_check_compares_with_the_best_earlier_run_on_the_same_scorer(fresh_home):
    con = open_history(read_only=False)
    seed_run(con, "r1", "2026-01-01", "ad1", 0.5, 0.70, {"a": (0.5, 0.7)})
    seed_run(con, "r2", "2026-01-02", "ad2", 0.5, 0.95, {"a": (0.5, 0.95)}, scorer="another-scorer")
    seed_run(con, "r3", "2026-01-03", "ad3", 0.5, 0.695, {"a": (0.5, 0.695)})  # within its CI (±0.01) of 0.70
    con.close()
    passed, metadata = run_check("r3")
    assert passed and metadata["previous_best_run"] == "r1"

    con = open_history(read_only=False)
    seed_run(con, "r4", "2026-01-04", "ad4", 0.5, 0.60, {"a": (0.5, 0.6)})  # CI high 0.61 < 0.70
    con.close()
    passed, metadata = run_check("r4")
    assert not passed
    assert metadata["previous_best_value"] == 0.70  # r2's 0.95 used another scorer


def test_first_run_passes(fresh_home):
    con = open_history(read_only=False)
    seed_run(con, "r1", "2026-01-01", "ad1", 0.5, 0.7, {"a": (0.5, 0.7)})
    con.close()
    passed, metadata = run_check("r1")
    assert passed and metadata["previous_best"] == "none (first run on this dataset and scorer)"
    assert metadata["run_id"] == "r1" and metadata["value"] == 0.7


def test_an_empty_summary_is_a_warning_and_a_failed_check_naming_the_dialogue(fresh_home, monkeypatch):
    import dagster as dg

    import lorasum_assets.ml.generation.generate as generation
    from lorasum_assets.defs.assets import ALL_ASSETS
    from lorasum_assets.defs.checks import ALL_CHECKS
    from lorasum_assets.defs.resources.factory import build_resources
    from lorasum_assets.settings.profiles import get_profile

    real = generation.generate

    def first_summary_empty(*args, **kwargs):
        out = real(*args, **kwargs)
        out[0] = generation.Generation("", 0, False, out[0].latency_s)
        return out

    monkeypatch.setattr(generation, "generate", first_summary_empty)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], resources=build_resources(get_profile("tiny")), instance=instance,
                            selection=["raw_dialogsum", "filtered_split", "base_predictions"])
    assert result.success
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.asset_key.path[-1] == "base_predictions"]
    warnings = [e.user_message for e in instance.all_logs(result.run_id) if e.level == 30 and "summaries are empty" in e.user_message]
    print(evaluation.description, warnings, sep="\n")
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert evaluation.description.startswith("1 of 12 base_predictions summaries are empty: ")
    empty_id = evaluation.description.split(": ")[1].split(";")[0]
    assert warnings == [f"1 of 12 summaries are empty: {empty_id}; the check summaries_not_empty names them too"]
