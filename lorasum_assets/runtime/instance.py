"""Initializing the Dagster instance once, so concurrent first runs never race on its schema."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import sys
from pathlib import Path

import dagster as dg

from lorasum_assets.settings.env import DAGSTER_HOME_ENV, get_env


class InstanceSetupError(RuntimeError):
    pass


def init_instance(config: str | None = None) -> Path:
    """Create the instance's storage in ``DAGSTER_HOME`` under a file lock; idempotent.

    Four runs started together on a brand-new home would otherwise each create the SQLite
    schemas at once and can leave the home unusable. ``config`` (a dagster.yaml) is installed
    first when the home has none.
    """
    raw = get_env(DAGSTER_HOME_ENV)
    if not raw:
        raise InstanceSetupError("DAGSTER_HOME is not set; point it at the folder that keeps Dagster's runs")
    home = Path(raw).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".lorasum-init.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        target = home / "dagster.yaml"
        if config and not target.exists():
            shutil.copyfile(config, target)
        # Creating SQLite storage prints progress; keep stdout for the commands' own output (--json).
        with contextlib.redirect_stdout(sys.stderr), dg.DagsterInstance.get() as instance:
            instance.upgrade()
    return home
