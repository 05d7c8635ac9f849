"""Sweeps: a small YAML grid of training settings, one training and evaluation run per point.

```yaml
# every combination of the listed values is one point
lora_adapter:
  learning_rate: [0.001, 0.003, 0.005]
  lora_r: [8]
```

Each point runs the ``sweep_point`` job (lora_adapter → tuned_predictions → bertscore_report)
with its settings as run config; the data and the base predictions come from their latest
materializations, so every point is trained and scored on the same data. No dagster here.
"""

from __future__ import annotations

import itertools
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from lorasum_assets.ml.specs import TrainSpec, check_limits, with_overrides

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
