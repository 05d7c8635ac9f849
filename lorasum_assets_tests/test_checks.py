from lorasum_assets.defs.checks import compare_with_previous_best
from lorasum_assets.store import open_history

from .test_store import seed_run


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
