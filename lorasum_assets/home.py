"""Where the pipeline writes: everything lives under ``LORASUM_HOME`` (default ``./.lorasum``)."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "LORASUM_HOME"
DEFAULT_HOME = ".lorasum"


class UnsafePathError(ValueError):
    """A configured path points outside the lorasum home."""


def home_path() -> Path:
    """The home's path, without creating it (for commands that only read)."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def lorasum_home() -> Path:
    home = home_path()
    home.mkdir(parents=True, exist_ok=True)
    return home


DATABASE_ENV = "LORASUM_DATABASE"


def database_path() -> Path:
    return lorasum_home() / "lorasum.duckdb"


def database_location(create_home: bool = True) -> str:
    """The history database: ``LORASUM_DATABASE`` (a file, or ``md:<name>`` for MotherDuck), else
    ``lorasum.duckdb`` in the home (created unless ``create_home`` is False)."""
    if os.environ.get(DATABASE_ENV):
        return os.environ[DATABASE_ENV]
    return str(database_path() if create_home else home_path() / "lorasum.duckdb")


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
