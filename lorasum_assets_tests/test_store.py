"""Evaluation history: append-only, idempotent per run, views that answer the questions."""

import threading
import time

import duckdb
import pytest

from lorasum_assets.store import open_history
from lorasum_assets.store.schema import LEGACY_VERSION, SCHEMA_VERSION, current_version, migrate_file
from lorasum_assets.store.transactions import in_transaction
from lorasum_assets.store.writes import record_training_log, write_evaluation
from lorasum_assets_tests.helpers import seed_run


@pytest.fixture()
def con(fresh_home):
    connection = open_history(read_only=False)
    yield connection
    connection.close()


def test_a_retried_run_replaces_its_rows(con):
    seed_run(con, "run-a", "2026-01-01", "ad1", 0.5, 0.6, {"x": (0.5, 0.6)})
    seed_run(con, "run-a", "2026-01-01", "ad1", 0.5, 0.7, {"x": (0.5, 0.7)})
    assert con.execute("SELECT count(*) FROM eval_runs").fetchone()[0] == 1
    assert con.execute("SELECT count(*) FROM eval_metrics").fetchone()[0] == 3
    assert con.execute("SELECT value FROM eval_metrics WHERE model = 'tuned'").fetchone()[0] == 0.7
    seed_run(con, "run-b", "2026-01-02", "ad2", 0.5, 0.65, {"x": (0.5, 0.65)})
    assert con.execute("SELECT count(*) FROM eval_runs").fetchone()[0] == 2


def test_a_failed_write_leaves_nothing(con):
    with pytest.raises(duckdb.Error):
        write_evaluation(con, dict(run_id="bad", created_at="2026-01-01"), [dict(run_id="bad", no_such_column=1)], [])
    assert con.execute("SELECT count(*) FROM eval_runs").fetchone()[0] == 0


def test_views_answer_history_best_adapter_and_worse_examples(con):
    seed_run(con, "r1", "2026-01-01", "ad1", 0.50, 0.55, {"a": (0.5, 0.6), "b": (0.5, 0.4)})
    seed_run(con, "r2", "2026-01-02", "ad2", 0.50, 0.70, {"a": (0.5, 0.7), "b": (0.5, 0.7)})
    seed_run(con, "r3", "2026-01-03", "ad3", 0.50, 0.60, {"a": (0.6, 0.5), "b": (0.5, 0.7)})
    seed_run(con, "r4", "2026-01-04", "ad4", 0.50, 0.99, {"a": (0.5, 0.99)}, scorer="other-scorer")

    # how did tuned F1 change across the last N runs
    last = con.execute(
        "SELECT run_id, value FROM eval_history WHERE model = 'tuned' AND metric = 'bertscore_f1' AND scorer_hash = 's1' "
        "ORDER BY created_at DESC LIMIT 2"
    ).fetchall()
    assert last == [("r3", 0.60), ("r2", 0.70)]

    # which adapter is best on this dataset and metric (same scorer hash only)
    best = con.execute(
        "SELECT adapter_id FROM best_adapters WHERE dataset_hash = 'd1' AND scorer_hash = 's1' AND metric = 'bertscore_f1' AND rank = 1"
    ).fetchall()
    assert best == [("ad2",)]

    # examples where tuned is worse than base
    worse = con.execute("SELECT run_id, id FROM tuned_worse_examples ORDER BY run_id, id").fetchall()
    assert worse == [("r1", "b"), ("r3", "a")]

    # bertscore_report shows the latest run only
    assert {r[0] for r in con.execute("SELECT run_id FROM bertscore_report").fetchall()} == {"r4"}


def test_training_steps_are_keyed_by_run_so_no_run_overwrites_another(con):
    class Log:
        step, epoch, loss, learning_rate, grad_norm, label_tokens, seconds = 1, 0.1, 2.0, 1e-4, 0.5, 10, 0.1

    record_training_log(con, "k", "run-1", steps=[Log])
    Log.loss = 1.5
    record_training_log(con, "k", "run-2", steps=[Log])  # the same config and data trained again
    record_training_log(con, "k", "run-2", steps=[Log])  # a step logged twice by one run is kept once
    rows = con.execute("SELECT run_id, step, loss FROM training_steps ORDER BY run_id").fetchall()
    assert rows == [("run-1", 1, 2.0), ("run-2", 1, 1.5)]


def test_an_older_database_upgrades_in_place(tmp_path):
    path = str(tmp_path / "old.duckdb")
    old = duckdb.connect(path)
    old.execute("CREATE TABLE schema_version (version INTEGER, applied_at TIMESTAMP)")
    assert current_version(old) == 0
    old.execute("CREATE TABLE eval_runs (run_id VARCHAR PRIMARY KEY, created_at TIMESTAMP, profile VARCHAR, params JSON, code_version VARCHAR, "
                "base_model VARCHAR, dataset_hash VARCHAR, split VARCHAR, n_examples INTEGER, adapter_id VARCHAR, adapter_sha256 VARCHAR, scorer_hash VARCHAR)")
    old.execute("INSERT INTO eval_runs (run_id, created_at) VALUES ('kept', '2025-01-01')")
    old.close()
    con = duckdb.connect(path)
    assert migrate_file(con) == LEGACY_VERSION
    assert current_version(con) == LEGACY_VERSION
    assert con.execute("SELECT run_id FROM eval_runs").fetchall() == [("kept",)]
    assert con.execute("SELECT count(*) FROM eval_history").fetchone()[0] == 0
    assert migrate_file(con) == LEGACY_VERSION  # idempotent


def test_a_single_file_history_moves_into_the_lake_on_first_open(fresh_home):
    legacy = duckdb.connect(str(fresh_home / "lorasum.duckdb"))
    migrate_file(legacy)
    seed_run(legacy, "old-run", "2025-06-01 10:00:00", "ad-old", 0.5, 0.6, {"a": (0.5, 0.6)})
    legacy.execute("INSERT INTO filtered_split_by_run VALUES ('old-run', 'test', 'a', 'hi', ['s'], 't', 0)")
    legacy.execute("INSERT INTO materializations VALUES ('filtered_split', 'old-run', now(), 1, NULL, NULL)")
    legacy.close()

    con = open_history()  # even a read-only first open moves it
    assert con.execute("SELECT max(version) FROM lorasum.schema_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("SELECT run_id, adapter_id FROM eval_runs").fetchall() == [("old-run", "ad-old")]
    assert con.execute("SELECT count(*) FROM eval_history").fetchone()[0] == 3
    assert con.execute("SELECT id, \"references\" FROM filtered_split").fetchall() == [("a", ["s"])]
    con.close()
    assert not (fresh_home / "lorasum.duckdb").exists()
    assert (fresh_home / "lorasum.duckdb.imported").exists()
    again = open_history(read_only=False)  # a second open imports nothing twice
    assert again.execute("SELECT count(*) FROM eval_runs").fetchone()[0] == 1


def test_a_readers_transaction_reads_one_state_of_the_catalog_database(con):
    """DuckLake reads its catalog in several queries per transaction; a commit landing between two
    of them once gave a reader a stats row without its columns (an internal error)."""
    seed_run(con, "run-a", "2026-01-01", "ad1", 0.5, 0.6, {"x": (0.5, 0.6)})
    reader = open_history()
    catalog = reader.execute("SELECT database_name FROM duckdb_databases() WHERE database_name LIKE '__ducklake_metadata_%'").fetchone()[0]
    snapshots = f"SELECT count(*) FROM {catalog}.ducklake_snapshot"
    reader.execute("BEGIN TRANSACTION")
    before = reader.execute(snapshots).fetchone()[0]
    seed_run(con, "run-b", "2026-01-02", "ad2", 0.5, 0.65, {"x": (0.5, 0.65)})  # another writer commits
    assert reader.execute(snapshots).fetchone()[0] == before
    assert reader.execute("SELECT count(*) FROM eval_runs").fetchone()[0] == 1
    reader.execute("COMMIT")
    assert reader.execute(snapshots).fetchone()[0] > before
    assert reader.execute("SELECT count(*) FROM eval_runs").fetchone()[0] == 2
    with pytest.raises(duckdb.Error, match="read-only"):
        reader.execute("DELETE FROM eval_runs")
    reader.close()


def test_transaction_rolls_back(con):
    def body(con):
        con.execute("INSERT INTO run_failures VALUES ('r', 'j', now(), 'e')")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        in_transaction(con, body)
    assert con.execute("SELECT count(*) FROM run_failures").fetchone()[0] == 0


def test_a_version_1_database_keeps_its_rows_when_tables_become_run_scoped(tmp_path):
    from lorasum_assets.store.schema import MIGRATIONS

    con = duckdb.connect(str(tmp_path / "v1.duckdb"))
    con.execute("CREATE TABLE schema_version (version INTEGER, applied_at TIMESTAMP)")
    for statement in MIGRATIONS[0]:
        con.execute(statement)
    con.execute("INSERT INTO schema_version VALUES (1, now())")
    con.execute("""INSERT INTO filtered_split VALUES ('test', 'a', 'hi', ['s'], 't', 0), ('test', 'b', 'yo', ['s'], 't', 1)""")
    con.execute("INSERT INTO tuned_predictions VALUES ('test', 'a', 'p', 1, false, 0.1, 'ad1', 'run-9')")
    con.execute("INSERT INTO training_steps VALUES ('k', 'run-9', 1, 0.1, 2.0, 1e-4, 0.5, 10, 0.1, now())")
    assert migrate_file(con) == LEGACY_VERSION
    assert con.execute("SELECT run_id, count(*) FROM filtered_split_by_run GROUP BY ALL").fetchall() == [("legacy", 2)]
    assert con.execute("SELECT count(*) FROM filtered_split").fetchone()[0] == 2  # the view shows the kept rows
    assert con.execute("SELECT run_id, adapter_id FROM tuned_predictions").fetchall() == [("run-9", "ad1")]
    assert con.execute("SELECT run_id, step FROM training_steps").fetchall() == [("run-9", 1)]
    con.execute("INSERT INTO training_steps VALUES ('k', 'run-10', 1, 0.1, 1.0, 1e-4, 0.5, 10, 0.1, now())")  # same key, other run
    assert con.execute("SELECT count(*) FROM training_steps").fetchone()[0] == 2
    assert "base_fingerprint" in {r[0] for r in con.execute("DESCRIBE adapters").fetchall()}


def test_a_busy_store_delays_the_write_never_the_caller():
    from lorasum_assets.store.buffer import BackgroundWriter

    store_free = threading.Event()
    written, errors = [], []

    def write(batch):
        if not store_free.is_set():
            raise RuntimeError("database is locked")
        written.extend(batch)

    writer = BackgroundWriter(write, interval_s=0.05, on_error=errors.append)
    started = time.monotonic()
    for step in range(200):
        writer.put(step)
    handed_over = time.monotonic() - started
    time.sleep(0.3)
    assert written == [] and errors and "will retry" in errors[0]
    store_free.set()
    assert writer.close()
    assert written == list(range(200))  # every row, once, in order
    assert handed_over < 0.05


def test_a_long_wait_is_reported_once_naming_what_it_waits_for(monkeypatch):
    from lorasum_assets.store import transactions as history

    monkeypatch.setattr(history, "WAIT_REPORT_AFTER_S", 0.2)
    free_at = time.monotonic() + 0.6
    reports = []

    def write():
        if time.monotonic() < free_at:
            raise RuntimeError("Failed to commit DuckLake transaction: database is locked")
        return "written"

    assert history.retry_busy(write, "the history catalog sqlite:/x", on_wait=reports.append) == "written"
    assert len(reports) == 1
    assert reports[0].startswith("waiting ") and "for the history catalog sqlite:/x: another writer holds the catalog" in reports[0]


MAKE_V3_HISTORY = """
import sys
import lorasum_assets.store.lake as lake
import lorasum_assets.store.schema as schema
schema.SCHEMA_VERSION = lake.SCHEMA_VERSION = 3  # the lorasum before the promotion registry
schema.LAKE_MIGRATIONS = {}
sys.path.insert(0, sys.argv[1])
from helpers import seed_run
con = lake.open_history(read_only=False)
seed_run(con, "v3-run", "2026-01-01", "ad-v3", 0.5, 0.6, {"a": (0.5, 0.6)})
print(con.execute("SELECT max(version) FROM lorasum.schema_version").fetchone()[0])
"""

READ_SCOPE = """
from lorasum_assets.store import open_history
con = open_history()
print(con.execute("SELECT run_id, dataset, generation_hash FROM eval_scope ORDER BY run_id").fetchall())
"""


def test_a_v3_history_gains_the_promotion_registry_and_keeps_its_rows(fresh_home):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "LORASUM_HOME": str(fresh_home)}
    made = subprocess.run([sys.executable, "-c", MAKE_V3_HISTORY, str(Path(__file__).parent)], env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == "3"

    con = open_history()  # a reader of the newer lorasum adds what v4 brings
    assert con.execute("SELECT max(version) FROM lorasum.schema_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("SELECT run_id, adapter_id FROM eval_runs").fetchall() == [("v3-run", "ad-v3")]
    assert con.execute("SELECT count(*) FROM promotions").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM production_adapters").fetchone()[0] == 0
    con.close()
    writer = open_history(read_only=False)
    seed_run(writer, "v4-run", "2026-01-02", "ad-v4", 0.5, 0.7, {"a": (0.5, 0.7)})
    write_evaluation(writer, dict(run_id="v4-run", created_at="2026-01-02", base_model="m", dataset_hash="d1", split="test",
                                  adapter_id="ad-v4", scorer_hash="s1"), [], [], scope={"dataset": "sample", "generation_hash": "g"})
    writer.close()
    # another process reads what this one wrote into the new tables
    read = subprocess.run([sys.executable, "-c", READ_SCOPE], env=env, capture_output=True, text=True)
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == "[('v4-run', 'sample', 'g')]"


def test_a_lake_created_but_without_tables_yet_reads_as_no_history(tmp_path):
    """The moment a first run has created the DuckLake but not yet its tables: a reader is told
    there is no history yet, as before the file existed."""
    import duckdb as duck

    from lorasum_assets.store.lake import HistoryNotFoundError, _engine_config, history_location

    catalog = tmp_path / "history" / "catalog.sqlite"
    catalog.parent.mkdir()
    engine = duck.connect(config=_engine_config())
    engine.execute("LOAD ducklake")
    engine.execute("LOAD sqlite_scanner")
    engine.execute(f"ATTACH 'ducklake:sqlite:{catalog}' AS early (DATA_PATH '{tmp_path / 'history' / 'data'}/')")
    engine.close()
    with pytest.raises(HistoryNotFoundError, match="no tables"):
        open_history(location=history_location(f"sqlite:{catalog}"))


def test_two_machines_creating_one_postgres_history_at_once_retry_instead_of_failing():
    from lorasum_assets.store.transactions import is_busy_error

    second_create = duckdb.Error('Failed to initialize DuckLake:Failed to execute query "CREATE TABLE "public"."ducklake_metadata"'
                                 '("key" VARCHAR NOT NULL, ...);": ERROR:  relation "ducklake_metadata" already exists')
    assert is_busy_error(second_create)
    assert not is_busy_error(duckdb.Error('relation "eval_runs" does not exist'))


def _postgres_history(server, tmp_path):
    from lorasum_assets.store.lake import history_location, prepare

    catalog = f"postgres:dbname=lorasum host={server['host']} port={server['port']} user={server['user']}"
    location = history_location(catalog, f"{tmp_path}/data/")
    prepare(location)
    return location


def test_a_history_server_that_restarts_is_waited_for_and_the_wait_reported_once(tmp_path, monkeypatch):
    """The server goes away between two writes and comes back 3 s later: the write waits, lands
    once, and the wait is reported once with the server's address, then its end."""
    from lorasum_assets.store.lake import connect
    from lorasum_assets_tests.helpers import running_postgres

    monkeypatch.setenv("LORASUM_HOME", str(tmp_path / "home"))
    with running_postgres(port=55471) as server:
        location = _postgres_history(server, tmp_path)
        reports: list[str] = []
        con = connect(location, read_only=False, on_wait=reports.append)
        record_training_log(con, "key", "run-1", steps=[_step(1)])
        con.close()

        server.stop()
        threading.Timer(3.0, server.start).start()
        started = time.monotonic()
        con = connect(location, read_only=False, on_wait=reports.append)  # a cursor of the engine whose connections died
        record_training_log(con, "key", "run-1", steps=[_step(2)])
        waited = time.monotonic() - started
        rows = con.execute("SELECT step, count(*) FROM training_steps WHERE run_id = 'run-1' GROUP BY step ORDER BY step").fetchall()
        con.close()
    print(f"waited {waited:.1f}s; reported: {reports}")
    assert rows == [(1, 1), (2, 1)]
    assert 2.5 < waited < 30
    assert len(reports) == 2, reports
    assert reports[0].startswith(f"the history server ({location.describe()}) is unreachable: ")
    assert "waiting up to 300s for it to come back (LORASUM_HISTORY_WAIT_S)" in reports[0]
    assert reports[1].startswith(f"the history server ({location.describe()}) answers again after ")


def test_a_history_server_down_past_the_wait_fails_naming_it(tmp_path, monkeypatch):
    from lorasum_assets.store.lake import connect
    from lorasum_assets.store.transactions import HistoryUnreachableError
    from lorasum_assets_tests.helpers import running_postgres

    monkeypatch.setenv("LORASUM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORASUM_HISTORY_WAIT_S", "2")
    with running_postgres(port=55472) as server:
        location = _postgres_history(server, tmp_path)
        server.stop()
        started = time.monotonic()
        with pytest.raises(HistoryUnreachableError) as failure:
            con = connect(location, read_only=False, on_wait=lambda message: None)
            record_training_log(con, "key", "run-1", steps=[_step(1)])
        waited = time.monotonic() - started
    print(f"after {waited:.1f}s: {failure.value}")
    assert 2.0 <= waited < 10
    assert str(failure.value).startswith(f"the history server ({location.describe()}) did not answer for ")
    assert "longer than the 2s LORASUM_HISTORY_WAIT_S allows" in str(failure.value)


def test_the_server_wait_setting_is_checked(monkeypatch):
    from lorasum_assets.store.transactions import server_wait_s

    monkeypatch.setenv("LORASUM_HISTORY_WAIT_S", "soon")
    with pytest.raises(ValueError, match="LORASUM_HISTORY_WAIT_S='soon': expected a number of seconds"):
        server_wait_s()


def _step(number: int):
    from lorasum_assets.ml.training.records import StepLog

    return StepLog(step=number, epoch=0.1 * number, loss=1.0, learning_rate=1e-4, grad_norm=0.5, label_tokens=10, seconds=0.1)
