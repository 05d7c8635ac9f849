"""Where the history lives: a DuckLake, a catalog database plus Parquet data files.

Many processes, and many machines, read and write it at once. A reader's session holds no lock
between its queries, and a transaction reads one snapshot however long it stays open; a writer
commits a new snapshot. The catalog is SQLite in WAL mode (one machine, the default, under
``$LORASUM_HOME/history/``) or PostgreSQL (many machines, with the data files on shared or object
storage). ``LORASUM_HISTORY`` names it; ``open_history()`` is the way in for notebooks.
"""

from __future__ import annotations

import fcntl
import importlib.util
import re
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb

from lorasum_assets.runtime.home import HISTORY_DATA_ENV, HISTORY_ENV, history_setting, home_path, legacy_database_path
from lorasum_assets.store.legacy import import_legacy_file
from lorasum_assets.store.schema import SCHEMA_VERSION, ensure_lake_schema
from lorasum_assets.store.transactions import retry_busy

ALIAS = "lorasum"
CATALOG_EXTENSIONS = {"sqlite": "sqlite_scanner", "postgres": "postgres_scanner"}
# Inserts up to this many rows stay in the catalog instead of becoming a Parquet file of their own:
# step logs, metrics and registry rows are small and frequent.
INLINE_ROW_LIMIT = 200


class HistorySettingError(ValueError):
    """``LORASUM_HISTORY`` names no catalog we can use."""


class HistoryNotFoundError(FileNotFoundError):
    """Nothing has been written to the history yet."""

    def __init__(self, where: str) -> None:
        super().__init__(f"no lorasum history at {where} yet; run the pipeline first (make demo)")


@dataclass(frozen=True)
class HistoryLocation:
    """A DuckLake catalog (``sqlite:PATH`` or ``postgres:CONNINFO``) and, for a new one, where its
    data files go."""

    catalog: str
    data_path: str | None = None

    @property
    def kind(self) -> str:
        return self.catalog.split(":", 1)[0]

    @property
    def sqlite_path(self) -> Path | None:
        return Path(self.catalog.split(":", 1)[1]) if self.kind == "sqlite" else None

    def describe(self) -> str:
        """The catalog for messages, with any password hidden."""
        return re.sub(r"(password\s*=\s*)\S+", r"\1***", self.catalog, flags=re.IGNORECASE)

    def attach_sql(self, read_only: bool, with_data_path: bool = False) -> str:
        options = []
        if with_data_path and self.data_path:
            options.append(f"DATA_PATH {_quote(self.data_path)}")
        if read_only:
            options.append("READ_ONLY")
            if self.kind == "sqlite":
                # DuckLake reads its catalog in several queries per transaction. SQLite attached
                # read-only reads each query at the newest commit (a second SELECT in one
                # transaction saw another process's commit), and a reader polling during a run once
                # failed loading table stats ("GetValueInternal on a value that is NULL").
                # Attached read-write, a transaction reads one WAL snapshot, which blocks no
                # writer; the lake itself stays read-only.
                options.append("META_READ_ONLY false")
        suffix = f" ({', '.join(options)})" if options else ""
        return f"ATTACH {_quote('ducklake:' + self.catalog)} AS {ALIAS}{suffix}"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def history_location(catalog: str | None = None, data_path: str | None = None) -> HistoryLocation:
    """The history named by ``catalog`` (default ``LORASUM_HISTORY``), else a SQLite catalog in
    the home; a SQLite catalog's data files go beside it unless ``data_path`` says otherwise."""
    from_env = history_setting()
    catalog, data_path = catalog or from_env[0], data_path or from_env[1]
    if catalog is None:
        folder = home_path() / "history"
        return HistoryLocation(f"sqlite:{folder / 'catalog.sqlite'}", data_path or f"{folder / 'data'}/")
    kind, _, rest = catalog.partition(":")
    if kind not in CATALOG_EXTENSIONS or not rest:
        raise HistorySettingError(
            f"{HISTORY_ENV}={catalog!r}; expected sqlite:PATH or postgres:CONNINFO (for example postgres:dbname=lorasum host=db)"
        )
    if kind == "sqlite":
        path = Path(rest).expanduser().resolve()
        return HistoryLocation(f"sqlite:{path}", data_path or f"{path.parent / 'data'}/")
    return HistoryLocation(catalog, data_path)


def extension_directory() -> str:
    """The DuckDB extensions installed from PyPI (``duckdb-ext-*``): nothing is downloaded."""
    spec = importlib.util.find_spec("duckdb_ext")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the DuckLake extension is not installed (pip install duckdb-ext-ducklake duckdb-ext-sqlite duckdb-ext-postgres)")
    return str(Path(next(iter(spec.submodule_search_locations))) / "extensions")


def init_statements(location: HistoryLocation, read_only: bool) -> list[str]:
    """What a DuckDB session runs to see the history: the CLI's init file is made of these too."""
    statements = [
        f"SET extension_directory = {_quote(extension_directory())}",
        # Nothing is downloaded; an installed extension (httpfs for s3:// data) still loads by itself.
        "SET autoinstall_known_extensions = false",
        "LOAD ducklake",
        f"LOAD {CATALOG_EXTENSIONS[location.kind]}",
        location.attach_sql(read_only),
    ]
    # Readers keep their own tables in memory; the history's tables and views resolve by name.
    statements.append(f"SET search_path = 'memory.main,{ALIAS}.main'" if read_only else f"USE {ALIAS}")
    return statements


def _prepare_sqlite_catalog(path: Path) -> None:
    """WAL mode, set once in the file: readers never block the writer, nor the writer readers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=60)
    try:
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def _attach(con: duckdb.DuckDBPyConnection, location: HistoryLocation, read_only: bool) -> None:
    try:
        con.execute(location.attach_sql(read_only))
    except duckdb.Error as exc:
        if read_only and "creating a new DuckLake is explicitly disabled" in str(exc):
            raise HistoryNotFoundError(location.describe()) from exc
        if "data_path is not set" not in str(exc):
            raise
        if read_only:
            raise HistoryNotFoundError(location.describe()) from exc
        if not location.data_path:
            raise HistorySettingError(
                f"the history {location.describe()} is new: set {HISTORY_DATA_ENV} to the folder or object-store URL "
                "for its data files (every machine must reach it)"
            ) from exc
        con.execute(location.attach_sql(read_only, with_data_path=True))
        con.execute(f"CALL {ALIAS}.set_option('data_inlining_row_limit', {INLINE_ROW_LIMIT})")


def _engine_config() -> dict:
    # The extensions are the pinned PyPI packages in this environment. Checking their signatures
    # reads each ~50 MB file whole on every load (0.6 s for the two, against 0.03 s without), for
    # files only someone who could already change this environment could replace.
    return {"extension_directory": extension_directory(), "autoinstall_known_extensions": False, "allow_unsigned_extensions": True}


_engines: OrderedDict[tuple[str, bool], duckdb.DuckDBPyConnection] = OrderedDict()
_engines_lock = threading.Lock()
_MAX_ENGINES = 8


def _engine(location: HistoryLocation, read_only: bool, on_wait: Callable[[str], None] | None, timeout_s: float):
    """One DuckDB instance per process and history with the extensions loaded and the history
    attached; every connection is a cursor of it. A DuckLake reads the newest snapshot at the
    start of each transaction, so a long-lived attachment sees every other writer's commits."""
    key = (location.catalog, read_only)
    with _engines_lock:
        if key in _engines:
            _engines.move_to_end(key)
            return _engines[key]

        def attempt() -> duckdb.DuckDBPyConnection:
            if location.kind == "sqlite" and not read_only:
                _prepare_sqlite_catalog(location.sqlite_path)
            engine = duckdb.connect(config=_engine_config())
            try:
                engine.execute("LOAD ducklake")
                engine.execute(f"LOAD {CATALOG_EXTENSIONS[location.kind]}")
                _attach(engine, location, read_only)
            except BaseException:
                engine.close()
                raise
            return engine

        engine = retry_busy(attempt, f"the history catalog {location.describe()}", timeout_s=timeout_s, on_wait=on_wait,
                            server=location.describe())
        _engines[key] = engine
        while len(_engines) > _MAX_ENGINES:
            _engines.popitem(last=False)[1].close()
        return engine


def connect(
    location: HistoryLocation, read_only: bool, on_wait: Callable[[str], None] | None = None, timeout_s: float = 600.0
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the history attached as ``lorasum``: writers ``USE`` it, readers
    find its tables and views by name and keep tables of their own in memory."""
    if location.kind == "sqlite" and read_only and not location.sqlite_path.exists():
        raise HistoryNotFoundError(str(location.sqlite_path))
    con = _engine(location, read_only, on_wait, timeout_s).cursor()

    def enter() -> int | None:
        con.execute(init_statements(location, read_only)[-1])
        return stored_schema_version(con) if read_only or location.kind == "postgres" else None

    # A PostgreSQL catalog's pooled connections outlive a server restart and fail once each: the
    # first read, retried while the server is away, leaves the pool connected.
    version = retry_busy(enter, f"reading the history {location.describe()}", timeout_s=timeout_s, on_wait=on_wait,
                         server=location.describe())
    if read_only and version is None:
        con.close()
        raise HistoryNotFoundError(f"{location.describe()} (no tables)")
    return con


def stored_schema_version(con: duckdb.DuckDBPyConnection) -> int | None:
    """The history's schema version, or None while it has no tables yet. (Not named after the
    table: DuckDB would take a Python object of that name in this frame for the table.)"""
    try:
        return con.execute(f"SELECT max(version) FROM {ALIAS}.schema_version").fetchone()[0]
    except duckdb.CatalogException:
        return None


@contextmanager
def _home_lock() -> Iterator[None]:
    """One process of this home at a time sets the history up (and imports the legacy file)."""
    folder = home_path()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".history.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare(location: HistoryLocation, on_wait: Callable[[str], None] | None = None) -> None:
    """Create the history's tables and views where they are missing, and move a single-file
    history of an older lorasum (``$LORASUM_HOME/lorasum.duckdb``) into it, once."""
    with _home_lock():
        con = connect(location, read_only=False, on_wait=on_wait)
        try:
            ensure_lake_schema(con)
            legacy = legacy_database_path()
            if legacy.exists():
                import_legacy_file(con, legacy, on_wait=on_wait)
                legacy.rename(legacy.with_name(legacy.name + ".imported"))
        finally:
            con.close()


def write_init_file(location: HistoryLocation, path: Path) -> Path:
    """A DuckDB CLI init file that opens the history read-only: ``duckdb -init PATH``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{statement};\n" for statement in init_statements(location, read_only=True)))
    return path


def open_history(read_only: bool = True, location: HistoryLocation | None = None) -> duckdb.DuckDBPyConnection:
    """The history as a DuckDB connection: every table and view (``eval_history``,
    ``bertscore_report``, ``best_adapters``, ``tuned_worse_examples``, ...) by its plain name.

    Read-only (the default) is what notebooks want: it never blocks a run, and tables you create
    go to this session's in-memory database. Wrap queries in ``BEGIN``/``COMMIT`` to read one
    consistent snapshot across them.
    """
    location = location or history_location()
    exists = location.kind != "sqlite" or location.sqlite_path.exists()
    if not read_only or (not exists and legacy_database_path().exists()):
        prepare(location)
    con = connect(location, read_only=read_only)
    if read_only and (stored_schema_version(con) or 0) < SCHEMA_VERSION:
        con.close()  # written by an older lorasum: its new tables and views are added first, once
        prepare(location)
        con = connect(location, read_only=True)
    return con
