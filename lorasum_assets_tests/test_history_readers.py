"""Readers and writers of the history at once, as users have them: a notebook session or a
`lorasum sql` shell left open for minutes while runs train, three runs at once under a polling
reader, and two machines (two homes here) sharing one history through a PostgreSQL catalog.

Each run is its own `dagster` process. docs/reliability.md quotes what these printed.
"""

import json
import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

import pytest

from lorasum_assets.store.lake import HistoryNotFoundError, history_location, open_history
from lorasum_assets_tests.helpers import (
    LORASUM,
    MATERIALIZE,
    REPO,
    TINY_STEPS,
    environment,
    finish,
    init_instance,
    open_instance,
    start,
)

pytestmark = pytest.mark.slow

HOLD_S = 240.0
LONG_TRAINING = {"ops": {"lora_adapter": {"config": {"epochs": 8}}}}  # a run long enough to be caught training


def timed_run(home: Path, run_config: dict | None = None) -> tuple[subprocess.Popen, float]:
    return start(home, "*", run_config), time.monotonic()


def wait_for_training(home: Path, process: subprocess.Popen, steps: int = 2) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with open_history() as con:
                if con.execute("SELECT count(*) FROM training_steps").fetchone()[0] >= steps:
                    return
        except HistoryNotFoundError:
            pass  # the run has not created the history yet
        time.sleep(0.2)
    raise AssertionError("the run never logged a training step")


def usual_run_seconds(tmp_path: Path) -> float:
    """The same run on a home of its own, with nobody reading."""
    home = tmp_path / "baseline"
    home.mkdir()
    (home / "models").symlink_to(Path(os.environ["LORASUM_HOME"]) / "models", target_is_directory=True)
    init_instance(home)
    process, started = timed_run(home, LONG_TRAINING)
    finish(process)
    return time.monotonic() - started


def counts(con) -> dict[str, int]:
    return {table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("eval_runs", "eval_metrics", "training_steps", "adapters", "materializations")}


def test_a_notebook_session_held_open_for_4_minutes_never_stops_a_run(fresh_home, tmp_path):
    baseline = usual_run_seconds(tmp_path)
    init_instance(fresh_home)
    finish(start(fresh_home, "*"))  # one evaluation in the history before
    run, started = timed_run(fresh_home, LONG_TRAINING)
    wait_for_training(fresh_home, run)

    reader = open_history(read_only=True)  # as a notebook keeps it
    reader.execute("BEGIN TRANSACTION")  # one snapshot for the whole session
    opened_at = time.monotonic()
    before = counts(reader)
    finish(run)
    run_seconds = time.monotonic() - started
    seen_while_held = []
    while time.monotonic() - opened_at < HOLD_S:
        seen_while_held.append(counts(reader))
        time.sleep(20)
    held = time.monotonic() - opened_at
    reader.execute("COMMIT")
    reader.close()

    after = counts(open_history())
    print(f"\nusual run {baseline:.1f}s; with a read-only session held {held:.0f}s from step 2 on: run {run_seconds:.1f}s; "
          f"snapshot {before}; after {after}")
    assert run_seconds <= baseline + 60
    assert all(seen == before for seen in seen_while_held)  # a consistent snapshot throughout
    assert held >= HOLD_S
    assert after["eval_runs"] == before["eval_runs"] + 1
    assert after["training_steps"] == TINY_STEPS + 8 * TINY_STEPS // 2  # both runs' steps, every one
    with open_history() as con:
        steps = [r[0] for r in con.execute(
            "SELECT step FROM training_steps WHERE run_id = (SELECT run_id FROM eval_runs ORDER BY created_at DESC LIMIT 1) ORDER BY step"
        ).fetchall()]
    assert steps == list(range(1, 8 * TINY_STEPS // 2 + 1))  # nothing lost


def read_until(fd: int, pattern: str, timeout: float = 60.0) -> re.Match:
    """Read the shell's output until ``pattern`` matches it (colour codes removed)."""
    seen = ""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, re.sub(r"\x1b\[[0-9;]*m", "", seen))
        if found:
            return found
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the shell never printed {pattern!r}; it printed: {seen[-2000:]}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            seen += os.read(fd, 65536).decode(errors="replace")


def shell_count(fd: int, mark: str, query: str) -> int:
    """One query typed into the shell; its result row carries ``mark`` (built by SQL so the echo of
    the typed line cannot match)."""
    os.write(fd, f"SELECT '{mark}' || '-' || 'n' AS mark, ({query}) AS n;\n".encode())
    return int(read_until(fd, rf"{mark}-n\s*[│|]\s*(\d+)")[1])


def test_an_interactive_lorasum_sql_shell_held_open_for_4_minutes_never_stops_a_run(fresh_home, tmp_path):
    baseline = usual_run_seconds(tmp_path)
    init_instance(fresh_home)
    finish(start(fresh_home, "*"))
    run, started = timed_run(fresh_home, LONG_TRAINING)
    wait_for_training(fresh_home, run)

    controller, terminal = pty.openpty()
    # TERM=dumb: the shell reads plain lines instead of querying the cursor position as it does
    # on a full terminal (a test has no terminal to answer).
    shell = subprocess.Popen([*LORASUM, "sql"], stdin=terminal, stdout=terminal, stderr=terminal, cwd=REPO,
                             env={**environment(fresh_home), "TERM": "dumb"}, start_new_session=True)
    os.close(terminal)
    opened_at = time.monotonic()
    try:
        read_until(controller, r'Enter "\.help"')
        os.write(controller, b"CREATE TABLE my_runs AS SELECT run_id FROM eval_runs;\n")
        assert shell_count(controller, "mine", "SELECT count(*) FROM my_runs") == 1
        finish(run)
        run_seconds = time.monotonic() - started
        while time.monotonic() - opened_at < HOLD_S:
            time.sleep(20)
            assert shell.poll() is None
        evaluations = shell_count(controller, "after", "SELECT count(*) FROM eval_runs")
        mine = shell_count(controller, "still", "SELECT count(*) FROM my_runs")
        held = time.monotonic() - opened_at
        os.write(controller, b".quit\n")
        shell.wait(timeout=30)
    finally:
        if shell.poll() is None:
            shell.kill()
        os.close(controller)
    print(f"\nusual run {baseline:.1f}s; with `lorasum sql` open {held:.0f}s from step 2 on: run {run_seconds:.1f}s; "
          f"the shell then saw {evaluations} evaluations, its own table {mine} row(s)")
    assert run_seconds <= baseline + 60
    assert held >= HOLD_S
    assert evaluations == 2 and mine == 1


def test_three_whole_graph_runs_at_once_while_history_is_polled_every_2s(fresh_home):
    init_instance(fresh_home)
    rates = (1e-3, 3e-3, 5e-3)
    runs = [start(fresh_home, "*", {"ops": {"lora_adapter": {"config": {"learning_rate": rate}}}}) for rate in rates]
    polls, failures, not_yet, most_seen = 0, [], 0, 0
    while any(run.poll() is None for run in runs):
        done = subprocess.run([*LORASUM, "history", "--json"], cwd=REPO, env=environment(fresh_home), capture_output=True, text=True)
        polls += 1
        if done.returncode != 0:
            if "no lorasum history" not in done.stdout:  # before the first run has created it (--json: errors on stdout)
                failures.append((done.returncode, done.stderr.strip()[-300:], done.stdout[-300:]))
            else:
                not_yet += 1
        else:
            most_seen = max(most_seen, len(json.loads(done.stdout)["rows"]))
        time.sleep(2)
    for run in runs:
        finish(run)
    final = json.loads(subprocess.run([*LORASUM, "history", "--json"], cwd=REPO, env=environment(fresh_home),
                                      capture_output=True, text=True, check=True).stdout)["rows"]

    with open_history() as con:
        evaluations = con.execute(
            "SELECT e.run_id, e.adapter_id, a.run_id FROM eval_runs e JOIN adapters a USING (adapter_id) ORDER BY 1"
        ).fetchall()
    with open_instance(fresh_home) as instance:
        statuses = [run.status.value for run in instance.get_runs()]
    print(f"\n3 runs at once: statuses {statuses}; {polls} polls of `lorasum history --json`: {not_yet} before the history "
          f"existed, {len(failures)} failed, at most {most_seen} runs seen while running; final history lists {len(final)} runs")
    assert statuses == ["SUCCESS"] * 3
    assert failures == []
    assert len(evaluations) == 3 and len(final) == 3
    assert all(eval_run == trained_in for eval_run, _, trained_in in evaluations)


# ------------------------------------------------------------------------------------------------
# Many machines: a PostgreSQL catalog, data files on a shared folder


def test_two_machines_run_the_whole_graph_at_once_into_one_postgres_history(postgres_server, tmp_path, session_home):
    shared_data = tmp_path / "shared-storage" / "lorasum"
    (session_home / "models").mkdir(exist_ok=True)  # the model cache both homes share
    homes = []
    for machine in ("machine-a", "machine-b"):
        home = tmp_path / machine
        home.mkdir()
        (home / "models").symlink_to(session_home / "models", target_is_directory=True)
        homes.append(home)

    def env(home: Path) -> dict:
        return {**environment(home), "LORASUM_HISTORY": postgres_server, "LORASUM_HISTORY_DATA": f"{shared_data}/"}

    for home in homes:
        subprocess.run([*LORASUM, "init-instance"], cwd=REPO, env=env(home), check=True, capture_output=True)
    runs = [subprocess.Popen([*MATERIALIZE, "--select", "*"], cwd=REPO, env=env(home),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for home in homes]
    for run in runs:
        finish(run)

    third = tmp_path / "laptop"
    third.mkdir()
    listing = subprocess.run([*LORASUM, "history", "--json"], cwd=REPO, capture_output=True, text=True,
                             env={**environment(third), "LORASUM_HISTORY": postgres_server})
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)["rows"]
    run_ids = {}
    for home in homes:
        with open_instance(home) as instance:
            run_ids[home.name] = [run.run_id for run in instance.get_runs()]
    print(f"\ntwo homes, one PostgreSQL catalog: `lorasum history` from a third home lists "
          f"{[(r['run_id'][:8], round(r['base'], 4), round(r['tuned'], 4)) for r in rows]}")
    assert sorted(r["run_id"] for r in rows) == sorted(sum(run_ids.values(), []))
    assert all(r["base"] is not None and r["tuned"] is not None for r in rows)
    assert list((shared_data / "main").iterdir())  # the data files are on the shared storage
    with open_history(location=history_location(postgres_server)) as con:
        evaluations = con.execute("SELECT e.run_id, a.run_id FROM eval_runs e JOIN adapters a USING (adapter_id)").fetchall()
    assert len(evaluations) == 2 and all(a == b for a, b in evaluations)
    assert not any((home / "history").exists() for home in homes)  # nothing went to a local history


def test_a_new_postgres_history_without_a_data_path_says_what_to_set(postgres_server, fresh_home, monkeypatch, capsys):
    monkeypatch.setenv("LORASUM_HISTORY", postgres_server)
    monkeypatch.delenv("LORASUM_HISTORY_DATA", raising=False)
    from lorasum_assets.store.lake import HistorySettingError
    from lorasum_assets.tools.cli import main

    with pytest.raises(HistorySettingError, match="is new: set LORASUM_HISTORY_DATA"):
        open_history(read_only=False)
    assert main(["history"]) == 1  # a reader of a history nobody created yet is told so
    assert "lorasum" in capsys.readouterr().err
