"""Where the pipeline writes: everything lives under ``LORASUM_HOME`` (default ``./.lorasum``)."""

from __future__ import annotations

import os
from pathlib import Path

from lorasum_assets.settings.env import HISTORY_DATA_ENV, HISTORY_ENV, HOME_ENV, get_env

DEFAULT_HOME = ".lorasum"


class UnsafePathError(ValueError):
    """A configured path points outside the lorasum home."""


def home_path() -> Path:
    """The home's path, without creating it (for commands that only read)."""
    return Path(get_env(HOME_ENV, DEFAULT_HOME)).expanduser().resolve()


def lorasum_home() -> Path:
    home = home_path()
    home.mkdir(parents=True, exist_ok=True)
    return home


def from_home(path: Path | str) -> str:
    """``path`` written from ``$LORASUM_HOME`` when it lies in the home, as a shell expands it: short
    enough for the UI's metadata, where a long absolute path does not wrap."""
    try:
        return f"${HOME_ENV}/{Path(path).resolve().relative_to(home_path())}"
    except ValueError:
        return str(path)


LEGACY_DATABASE = "lorasum.duckdb"


def history_setting() -> tuple[str | None, str | None]:
    """``LORASUM_HISTORY`` (the DuckLake catalog: ``sqlite:PATH`` or ``postgres:CONNINFO``; unset:
    a SQLite catalog in the home) and ``LORASUM_HISTORY_DATA`` (where a new history puts its data
    files; an existing one keeps the path it was created with)."""
    return get_env(HISTORY_ENV), get_env(HISTORY_DATA_ENV)


def legacy_database_path() -> Path:
    """The single-file DuckDB history of lorasum before DuckLake, migrated on first open."""
    return home_path() / LEGACY_DATABASE


def home_subdir(*parts: str) -> Path:
    """A folder under the home; ``parts`` may not climb out of it (``..`` or absolute parts).

    The check is lexical, so a symlink the user placed inside the home (say, a shared model
    cache) is honoured.
    """
    home = lorasum_home()
    path = Path(os.path.normpath(home.joinpath(*parts)))
    if path != home and home not in path.parents:
        raise UnsafePathError(f"{'/'.join(parts)!r} resolves outside LORASUM_HOME ({home})")
    path.mkdir(parents=True, exist_ok=True)
    return path
