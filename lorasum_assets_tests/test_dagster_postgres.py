"""Dagster as a multi-machine deployment runs it: a code server, the daemon and the webserver, each
its own process with its own working directory, sharing one instance on a real PostgreSQL server
(deploy/dagster-postgres.yaml as shipped), with the history in a DuckLake catalogued on the same
server. Everything is driven through the webserver's GraphQL API, as the UI drives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorasum_assets_tests.dagster_processes import (
    RELOAD,
    RUN_LOG,
    SCHEDULE_TICKS,
    SENSOR_TICKS,
    START_SCHEDULE,
    START_SENSOR,
    STOP_SCHEDULE,
    errors_of,
    finished,
    free_port,
    launch,
    pool_intervals,
    run_of,
    selector,
    start_deployment,
)
from lorasum_assets_tests.helpers import running_postgres

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres_tcp() -> Iterator[dict]:
    """PostgreSQL on a loopback port (Dagster's postgres_db settings take a host and a port), with
    two databases: `dagster` for the instance, `lorasum` for the history's catalog."""
    with running_postgres(("dagster", "lorasum"), port=free_port(), on_loopback=True) as server:
        yield server


def test_webserver_daemon_and_code_server_as_separate_processes_on_postgres(postgres_tcp, tmp_path):
    pg = postgres_tcp
    dagster_home = tmp_path / "dagster-home"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "DAGSTER_PG_HOST": pg["host"], "DAGSTER_PG_PORT": pg["port"], "DAGSTER_PG_DB": "dagster",
        "DAGSTER_PG_USER": pg["user"], "DAGSTER_PG_PASSWORD": "unused-with-trust-auth",
        "LORASUM_HOME": str(tmp_path / "lorasum-home"),
        "LORASUM_HISTORY": f"postgres:dbname=lorasum host={pg['host']} port={pg['port']} user={pg['user']}",
        "LORASUM_HISTORY_DATA": str(tmp_path / "history-data"),
        "LORASUM_PROFILE": "tiny",
        "LORASUM_RETRAIN_CRON": "* * * * *",  # the schedule ticks within a minute
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("LORASUM_WATCH_PATH", None)
    deployment = start_deployment(tmp_path, env, REPO / "deploy" / "dagster-postgres.yaml")
    try:
        assert "postgres" in (dagster_home / "dagster.yaml").read_text()
        # the daemon ticks the data-change sensor and the schedule
        assert deployment.graphql(START_SENSOR, selector=selector(sensorName="retrain_on_data_change"))["startSensor"]["__typename"] == "Sensor"
        assert deployment.graphql(START_SCHEDULE, selector=selector(scheduleName="weekly_retrain"))["startSchedule"]["__typename"] == "ScheduleStateResult"

        # two runs launched at once: both queued, dequeued by the daemon, their GPU steps one at a time
        queued = [launch(deployment), launch(deployment)]
        # a tick is read once it has ended: one still being evaluated shows STARTED
        sensor_tick = deployment.wait_until("a finished tick of the data-change sensor", lambda: [
            t for t in deployment.graphql(SENSOR_TICKS, selector=selector(sensorName="retrain_on_data_change"))[
                "sensorOrError"]["sensorState"]["ticks"] if t["status"] != "STARTED"], timeout=120)[0]
        print(f"data-change sensor tick: {sensor_tick['status']} ({sensor_tick['skipReason']})")
        assert sensor_tick["status"] == "SKIPPED" and "LORASUM_WATCH_PATH" in sensor_tick["skipReason"]
        def schedule_state() -> dict:
            return deployment.graphql(SCHEDULE_TICKS, selector=selector(scheduleName="weekly_retrain"))["scheduleOrError"]["scheduleState"]

        schedule_tick = deployment.wait_until("a schedule tick that requests a run",
                                              lambda: [t for t in schedule_state()["ticks"] if t["runIds"]], timeout=150)[0]
        stopped = deployment.graphql(STOP_SCHEDULE, id=schedule_state()["id"])["stopRunningSchedule"]
        assert stopped["__typename"] == "ScheduleStateResult", stopped
        scheduled = schedule_tick["runIds"][0]
        print(f"schedule tick: {schedule_tick['status']}, run {scheduled}")
        runs = {run_id: deployment.wait_until(f"run {run_id} to finish", lambda r=run_id: finished(deployment, r), timeout=600)
                for run_id in [*queued, scheduled]}
        for run_id, run in runs.items():
            if run["status"] != "SUCCESS":
                pytest.fail(f"run {run_id}: {run['status']}\n" + "\n".join(errors_of(deployment, run_id)))
            tags = {t["key"]: t["value"] for t in run["tags"]}
            print(f"run {run_id}: {run['status']}, tags {sorted(k for k in tags if k.startswith('lorasum/'))}")
        intervals = sorted(i for run in runs.values() for i in pool_intervals(run))
        assert len(intervals) == 3 * len(runs)
        for (start_a, end_a, step_a), (start_b, end_b, step_b) in zip(intervals, intervals[1:]):
            assert end_a <= start_b, f"{step_a} [{start_a}, {end_a}] overlaps {step_b} [{start_b}, {end_b}]"
        gaps = [intervals[i + 1][0] - intervals[i][1] for i in range(len(intervals) - 1)]
        print(f"lorasum_gpu steps of {len(runs)} runs: {len(intervals)} intervals, none overlapping (smallest gap {min(gaps):.2f} s)")
        waited = [e["message"] for run_id in queued for e in deployment.graphql(RUN_LOG, runId=run_id)["logsForRun"]["events"]
                  if e.get("message") and "pool" in e["message"].lower()]
        print(f"pool messages in the two launched runs' logs: {len(waited)}; first: {waited[:1]}")

        # the code server killed with SIGKILL in the middle of a run (its run worker dies with it)
        doomed = launch(deployment)
        deployment.wait_until(f"run {doomed} to start training", lambda: any(
            s["stepKey"] == "lora_adapter" for s in run_of(deployment, doomed)["stepStats"]), timeout=300)
        deployment.kill("code-server")
        deployment.start_code_server()
        deployment.wait_until("the webserver to reload the restarted code server", lambda: deployment.graphql(RELOAD)[
            "reloadRepositoryLocation"]["locationOrLoadError"]["__typename"] == "RepositoryLocation", timeout=180)
        dead = deployment.wait_until(f"run {doomed} to be marked failed", lambda: finished(deployment, doomed), timeout=300)
        assert dead["status"] == "FAILURE", dead
        messages = [e["message"] for e in deployment.graphql(RUN_LOG, runId=doomed)["logsForRun"]["events"] if e.get("message")]
        print(f"killed run {doomed}: {dead['status']}; last message: {messages[-1]!r}")
        after = launch(deployment)
        assert deployment.wait_until(f"run {after} to finish", lambda: finished(deployment, after), timeout=600)["status"] == "SUCCESS"
        print(f"run after the kill {after}: SUCCESS")
    finally:
        deployment.stop()

    # every run wrote its history to the DuckLake catalogued on the same server
    probe = ("import json; from lorasum_assets.store import open_history; con = open_history(read_only=True); "
             "print(json.dumps(con.execute('SELECT run_id FROM eval_runs').fetchall()))")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = {row[0] for row in json.loads(done.stdout.strip().splitlines()[-1])}
    assert {*queued, scheduled, after} <= evaluated and doomed not in evaluated, evaluated
    print(f"history on PostgreSQL: {len(evaluated)} evaluated runs")
