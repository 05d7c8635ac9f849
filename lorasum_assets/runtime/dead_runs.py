"""Crash recovery: runs whose process died still hold their pool slots; find them and free them.

A run killed with SIGKILL never reports its end, so Dagster keeps it STARTED and keeps the
``lorasum_gpu`` slot it claimed; with the pool limited to 1, every later run then waits forever.
Dagster's run monitoring frees slots only of runs that have *ended*, and its default run
launcher cannot tell a dead run worker from a live one. So lorasum checks the process that
started the run (the pid Dagster records with the run's start event): when no such process
lives, or the pid now belongs to a process started later, the run is marked failed and its
slots are freed. Runs launched elsewhere (Kubernetes) are left to their launcher's monitoring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg
import psutil
from dagster._core.launcher import DefaultRunLauncher
from dagster._core.storage.dagster_run import RunsFilter

LIVE_STATUSES = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING]


@dataclass(frozen=True)
class DeadRun:
    run_id: str
    job_name: str
    pid: int


def _run_process(instance: dg.DagsterInstance, run_id: str) -> tuple[int | None, float]:
    records = instance.get_records_for_run(run_id=run_id, of_type=dg.DagsterEventType.RUN_START, limit=1).records
    if not records:
        return None, 0.0
    entry = records[0].event_log_entry
    return entry.dagster_event.pid if entry.dagster_event else None, entry.timestamp


def process_alive(pid: int, started_before: float) -> bool:
    """True when ``pid`` is a live process that already existed at ``started_before``."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return process.create_time() <= started_before + 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def find_dead_runs(instance: dg.DagsterInstance, exclude_run_id: str | None = None) -> list[DeadRun]:
    """Runs on this machine that hold or wait for pool slots and whose process is gone."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits or not isinstance(instance.run_launcher, DefaultRunLauncher):
        return []
    run_ids = set(storage.get_concurrency_run_ids()) - {exclude_run_id}
    if not run_ids:
        return []
    dead = []
    for record in instance.get_run_records(RunsFilter(run_ids=sorted(run_ids), statuses=LIVE_STATUSES)):
        run = record.dagster_run
        pid, started_at = _run_process(instance, run.run_id)
        if pid is not None and not process_alive(pid, started_at):
            dead.append(DeadRun(run.run_id, run.job_name, pid))
    return dead


def release_dead_runs(
    instance: dg.DagsterInstance, exclude_run_id: str | None = None, log: Callable[[str], None] | None = None
) -> list[DeadRun]:
    """Mark each dead run failed and free its pool slots; returns what was released."""
    released = find_dead_runs(instance, exclude_run_id)
    for dead in released:
        run = instance.get_run_by_id(dead.run_id)
        if run is None:
            continue
        message = f"the process running this run (pid {dead.pid}) is gone; lorasum marked the run failed and freed its pool slots"
        if run.status not in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
            instance.report_run_failed(run, message)
        instance.event_log_storage.free_concurrency_slots_for_run(dead.run_id)
        if log is not None:
            log(f"run {dead.run_id} ({dead.job_name}): {message}")
    return released
