"""Runs a sweep: the data and base predictions once, then one ``sweep_point`` run per grid point.

Each point is its own Dagster run in its own process (``dagster job execute``), several at once;
each evaluates the adapter its own run trained, and the points are ranked from the history.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from lorasum_assets.home import home_subdir
from lorasum_assets.instance import init_instance
from lorasum_assets.store.lake import open_history
from lorasum_assets.store.queries import sweep_ranking
from lorasum_assets.sweep import point_label, point_run_config

PREPARED_ASSETS = "raw_dialogsum,filtered_split,tokenized_dataset,base_predictions"
SWEEP_TAG = "lorasum/sweep"
POINT_TAG = "lorasum/sweep_point"


@dataclass
class SweepResult:
    sweep_id: str
    header: tuple[str, ...]
    rows: list[tuple]
    all_succeeded: bool


def _dagster(*args: str) -> list[str]:
    return [sys.executable, "-m", "dagster", *args, "-m", "lorasum_assets.definitions"]


def _run_points(points: list[dict[str, Any]], sweep_id: str, parallel: int, folder: Path, log: Callable[[str], None]) -> dict[str, int]:
    pending = list(points)
    running: dict[str, tuple[subprocess.Popen, Any]] = {}
    codes: dict[str, int] = {}
    while pending or running:
        while pending and len(running) < max(parallel, 1):
            point = pending.pop(0)
            label = point_label(point)
            config = folder / f"point-{len(codes) + len(running)}.yaml"
            config.write_text(yaml.safe_dump(point_run_config(point)))
            out = (folder / f"{config.stem}.log").open("w")
            tags = json.dumps({SWEEP_TAG: sweep_id, POINT_TAG: label})
            command = [*_dagster("job", "execute", "-j", "sweep_point"), "-c", str(config), "--tags", tags]
            running[label] = (subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT), out)
            log(f"started point {label}")
        for label, (process, out) in list(running.items()):
            if process.poll() is not None:
                out.close()
                codes[label] = process.returncode
                del running[label]
                log(f"point {label}: {'done' if process.returncode == 0 else f'failed (exit {process.returncode}), log {out.name}'}")
        time.sleep(0.5)
    return codes


def _ranking(sweep_id: str, metric: str) -> list[tuple]:
    con = open_history(read_only=True)
    try:
        return sweep_ranking(con, sweep_id, metric)
    finally:
        con.close()


def run_sweep(points: list[dict[str, Any]], parallel: int, metric: str, log: Callable[[str], None]) -> SweepResult:
    if not os.environ.get("DAGSTER_HOME"):
        # Each point's process must find the data materializations the preparing run recorded.
        raise SystemExit("lorasum sweep: set DAGSTER_HOME (the points share its Dagster instance), e.g. DAGSTER_HOME=$PWD/.lorasum/dagster")
    init_instance()  # the points start together: create the instance's storage once first
    sweep_id = f"sweep-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    log(f"{sweep_id}: {len(points)} point(s), {parallel} at a time")
    folder = home_subdir("sweeps", sweep_id)  # run configs and each point's log
    prepare = subprocess.run([*_dagster("asset", "materialize"), "--select", PREPARED_ASSETS], capture_output=True, text=True)
    if prepare.returncode != 0:
        raise SystemExit(f"lorasum sweep: preparing the data and base predictions failed:\n{prepare.stdout[-3000:]}{prepare.stderr[-3000:]}")
    codes = _run_points(points, sweep_id, parallel, folder, log)
    header = ("rank", "point", "adapter_id", metric, "ci_low", "ci_high", "best_adapters_rank", "run_id")
    return SweepResult(sweep_id, header, _ranking(sweep_id, metric), all(code == 0 for code in codes.values()))
