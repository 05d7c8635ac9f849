"""Sweeps: a small YAML grid of training settings, one training and evaluation run per point.

```yaml
# every combination of the listed values is one point
lora_adapter:
  learning_rate: [0.001, 0.003, 0.005]
  lora_r: [8]
```

Each point runs the ``sweep_point`` job (lora_adapter → tuned_predictions → bertscore_report)
with its settings as run config; the data and the base predictions come from their latest
materializations, so every point is trained and scored on the same data. Each point is its own
Dagster run in its own process (``dagster job execute``), several at once; each evaluates the
adapter its own run trained, and the points are ranked from the history. No dagster import here.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from lorasum_assets.runtime.home import home_subdir
from lorasum_assets.runtime.instance import init_instance
from lorasum_assets.settings.env import DAGSTER_HOME_ENV, get_env
from lorasum_assets.settings.specs import TrainSpec, check_limits, with_overrides
from lorasum_assets.store.lake import open_history
from lorasum_assets.store.queries import sweep_ranking

GRID_SECTION = "lora_adapter"


class SweepGridError(ValueError):
    """A grid file that cannot be swept; the message names the file and the field."""


def load_grid(path: str | Path) -> list[dict[str, Any]]:
    """The points of a grid file, each a dict of lora_adapter settings, in a stable order."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text("utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SweepGridError(f"{path}: cannot read the grid: {exc}") from exc
    if not isinstance(raw, dict) or set(raw) != {GRID_SECTION} or not isinstance(raw[GRID_SECTION], dict) or not raw[GRID_SECTION]:
        raise SweepGridError(f"{path}: expected one mapping '{GRID_SECTION}:' of setting -> list of values")
    grid = raw[GRID_SECTION]
    known = {f.name for f in fields(TrainSpec)}
    for name, values in grid.items():
        if name not in known:
            raise SweepGridError(f"{path}: {name!r} is not a lora_adapter setting; known: {', '.join(sorted(known))}")
        if not isinstance(values, list) or not values:
            raise SweepGridError(f"{path}: {name} needs a non-empty list of values, got {values!r}")
    names = sorted(grid)
    points = [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]
    for point in points:
        try:
            check_limits(with_overrides(TrainSpec(), point))
        except (ValueError, TypeError) as exc:
            raise SweepGridError(f"{path}: point {point}: {exc}") from exc
    return points


def point_label(point: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(point.items()))


def point_run_config(point: dict[str, Any]) -> dict[str, Any]:
    return {"ops": {GRID_SECTION: {"config": dict(point)}}}


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


def prepare_run_config(data: str | None) -> dict[str, Any]:
    """Run config of the run that materializes the data and the base predictions the points share."""
    return {"ops": {"raw_dialogsum": {"config": {"source": "local", "path": data}}}} if data else {}


def run_sweep(
    points: list[dict[str, Any]], parallel: int, metric: str, log: Callable[[str], None], data: str | None = None
) -> SweepResult:
    if not get_env(DAGSTER_HOME_ENV):
        # Each point's process must find the data materializations the preparing run recorded.
        raise SystemExit("lorasum sweep: set DAGSTER_HOME (the points share its Dagster instance), e.g. DAGSTER_HOME=$PWD/.lorasum/dagster")
    init_instance()  # the points start together: create the instance's storage once first
    sweep_id = f"sweep-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    log(f"{sweep_id}: {len(points)} point(s), {parallel} at a time")
    folder = home_subdir("sweeps", sweep_id)  # run configs and each point's log
    prepare_config = folder / "prepare.yaml"
    prepare_config.write_text(yaml.safe_dump(prepare_run_config(data)))
    if data:
        log(f"data: {data} (source local)")
    prepare = subprocess.run([*_dagster("asset", "materialize"), "--select", PREPARED_ASSETS, "-c", str(prepare_config)],
                             capture_output=True, text=True)
    if prepare.returncode != 0:
        raise SystemExit(f"lorasum sweep: preparing the data and base predictions failed:\n{prepare.stdout[-3000:]}{prepare.stderr[-3000:]}")
    codes = _run_points(points, sweep_id, parallel, folder, log)
    header = ("rank", "point", "adapter_id", metric, "ci_low", "ci_high", "best_adapters_rank", "run_id")
    return SweepResult(sweep_id, header, _ranking(sweep_id, metric), all(code == 0 for code in codes.values()))
