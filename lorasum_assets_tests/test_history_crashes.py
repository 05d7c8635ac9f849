"""The history under concurrent writers and a writer killed mid-write: no row lost, no partial run."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from lorasum_assets.store import open_history
from lorasum_assets.store.lake import history_location
from lorasum_assets_tests.helpers import REPO

WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[4])
    from lorasum_assets.defs.resources.store import LorasumStore
    from lorasum_assets_tests.helpers import seed_run
    store = LorasumStore(history="sqlite:" + sys.argv[1])
    worker, runs = sys.argv[2], int(sys.argv[3])
    for i in range(runs):
        with store.connect() as con:
            seed_run(con, f"w{worker}-r{i}", "2026-01-01", f"ad{worker}", 0.5, 0.6,
                     {f"ex{k}": (0.5, 0.6) for k in range(12)})
    print("done", worker)
    """
)


@pytest.mark.slow
def test_four_processes_write_history_at_once_and_no_row_is_lost(tmp_path):
    db = tmp_path / "history" / "catalog.sqlite"
    workers, runs = 4, 15
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(w), str(runs), str(REPO)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(workers)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    con = open_history(location=history_location(f"sqlite:{db}"))
    found = con.execute("SELECT count(*) FROM eval_runs").fetchone()[0]
    metrics = con.execute("SELECT count(*) FROM eval_metrics").fetchone()[0]
    examples = con.execute("SELECT count(*) FROM eval_examples").fetchone()[0]
    print(f"\n{workers} processes x {runs} runs: written {workers * runs}, found {found} runs, {metrics} metric rows, {examples} example rows")
    assert found == workers * runs
    assert metrics == workers * runs * 3
    assert examples == workers * runs * 12 * 2


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    import time
    sys.path.insert(0, sys.argv[2])
    from lorasum_assets.store.lake import history_location, open_history
    from lorasum_assets_tests.helpers import seed_run
    con = open_history(read_only=False, location=history_location("sqlite:" + sys.argv[1]))
    seed_run(con, "complete", "2026-01-01", "ad1", 0.5, 0.6, {"a": (0.5, 0.6)})

    class HeldBeforeCommit:  # the connection, except that COMMIT waits to be killed: every row written, none committed

        def __getattr__(self, name):
            return getattr(con, name)

        def execute(self, sql, *args):
            if sql == "COMMIT":
                print("every row written, not yet committed", flush=True)
                time.sleep(600)
            return con.execute(sql, *args)

    seed_run(HeldBeforeCommit(), "partial", "2026-01-02", "ad2", 0.5, 0.6, {f"ex{k}": (0.5, 0.6) for k in range(200000)})
    print("finished", flush=True)
    """
)


def test_kill_9_during_a_write_leaves_no_partial_run(tmp_path):
    db = tmp_path / "history" / "catalog.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(db), str(REPO)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "every row written, not yet committed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    con = open_history(read_only=False, location=history_location(f"sqlite:{db}"))
    runs = sorted(r[0] for r in con.execute("SELECT run_id FROM eval_runs").fetchall())
    partial_examples = con.execute("SELECT count(*) FROM eval_examples WHERE run_id = 'partial'").fetchone()[0]
    partial_metrics = con.execute("SELECT count(*) FROM eval_metrics WHERE run_id = 'partial'").fetchone()[0]
    print(f"\nafter kill -9: runs {runs}, rows of the killed run: {partial_metrics} metrics, {partial_examples} examples")
    assert runs == ["complete"]
    assert partial_examples == partial_metrics == 0
    assert con.execute("SELECT count(*) FROM eval_examples WHERE run_id = 'complete'").fetchone()[0] == 2
