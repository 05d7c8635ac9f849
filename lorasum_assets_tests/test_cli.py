"""Every CLI subcommand against a seeded database, including while another process holds it."""

import json
import subprocess
import sys
import textwrap
import time

import duckdb
import pytest

from lorasum_assets.store import open_history
from lorasum_assets.tools.cli import main
from lorasum_assets_tests.helpers import seed_run


@pytest.fixture()
def seeded(fresh_home):
    con = open_history(read_only=False)
    seed_run(con, "run-1", "2026-01-01 10:00:00", "ad1", 0.50, 0.60, {"a": (0.5, 0.6), "b": (0.5, 0.4)})
    seed_run(con, "run-2", "2026-01-02 10:00:00", "ad2", 0.50, 0.70, {"a": (0.5, 0.9), "b": (0.5, 0.45)})
    seed_run(con, "run-3", "2026-01-03 10:00:00", "ad3", 0.50, 0.65, {"a": (0.5, 0.6)}, scorer="other")
    con.close()
    return fresh_home


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_history(seeded, capsys):
    out = run_json(capsys, "history", "-n", "2")
    assert [r["run_id"] for r in out["rows"]] == ["run-3", "run-2"]
    assert out["rows"][1]["tuned"] == pytest.approx(0.70)
    assert out["rows"][1]["tuned_ci_low"] == pytest.approx(0.69)
    assert main(["history"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("bertscore_f1 (best over each dialogue's references") and "run-1" in printed


def test_an_unknown_metric_lists_the_valid_ones_and_exits_non_zero(seeded, capsys):
    for argv in (["history", "--metric", "nope"], ["adapters", "--best", "--metric", "nope"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        assert "invalid choice: 'nope' (choose from 'bertscore_precision', 'bertscore_recall', 'bertscore_f1', 'rouge1', 'rouge2', 'rougeL', 'rougeLsum')" in capsys.readouterr().err


def test_history_filters_are_parameters_not_sql(seeded, capsys):
    out = run_json(capsys, "history", "--profile", "tiny' OR '1'='1")
    assert out["rows"] == []
    with pytest.raises(SystemExit):  # not a metric: refused before any SQL
        main(["history", "--metric", "bertscore_f1'; DROP TABLE eval_runs; --"])
    assert len(run_json(capsys, "history")["rows"]) == 3  # nothing was dropped


def test_report(seeded, capsys):
    out = run_json(capsys, "report", "--run", "run-2")
    assert out["run_id"] == "run-2"
    assert out["rows"][0]["tuned"] == pytest.approx(0.70)
    assert main(["report"]) == 0
    assert "run-3" in capsys.readouterr().out


def test_compare(seeded, capsys):
    out = run_json(capsys, "compare", "run-1", "run-2")
    tuned = next(m for m in out["metrics"] if m["model"] == "tuned" and m["metric"] == "bertscore_f1")
    # per example: a 0.6 -> 0.9, b 0.4 -> 0.45; the paired bootstrap CI of the mean change
    assert tuned["change"] == pytest.approx(0.175) and tuned["examples"] == 2
    assert tuned["ci_low"] == pytest.approx(0.05) and tuned["ci_high"] == pytest.approx(0.3)
    assert tuned["significant"] == "*"  # every resample improved
    base = next(m for m in out["metrics"] if m["model"] == "base" and m["metric"] == "bertscore_f1")
    assert base["change"] == 0 and base["significant"] == ""
    assert [e["id"] for e in out["examples"]] == ["a", "b"]  # a moved 0.3, b 0.05
    assert main(["compare", "run-1", "run-3"]) == 1
    assert "not comparable" in capsys.readouterr().err
    assert main(["compare", "run-1", "nope"]) == 1
    assert "no evaluation run" in capsys.readouterr().err
    for given in ("", "run-\udce2"):  # empty, and bytes the shell passed that are not UTF-8
        assert main(["compare", "run-1", given]) == 1
        assert "is a Dagster run id or a prefix of one" in capsys.readouterr().err


def test_export(seeded, capsys, tmp_path):
    out = run_json(capsys, "export", "--out", str(tmp_path / "x"), "--format", "parquet")
    rows = {r["table"]: r["rows"] for r in out["rows"]}
    assert rows["eval_runs"] == 3
    assert duckdb.connect().execute(f"SELECT count(*) FROM '{tmp_path / 'x' / 'eval_metrics.parquet'}'").fetchone()[0] == 9
    run_json(capsys, "export", "--out", str(tmp_path / "y"), "--format", "csv")
    assert (tmp_path / "y" / "eval_examples.csv").read_text().startswith("run_id,model,id")


def test_summarize_unknown_adapter(seeded, capsys):
    assert main(["summarize", "--adapter", "missing"]) == 1
    assert "no adapter with id 'missing'" in capsys.readouterr().err


HOLD_WRITE = textwrap.dedent(
    """
    import sys, time
    from lorasum_assets.store import open_history
    con = open_history(read_only=False)
    con.execute("BEGIN TRANSACTION")
    con.execute("INSERT INTO run_failures VALUES ('held', 'job', now(), 'x')")
    con.execute("SELECT count(*) FROM run_failures").fetchall()
    print("writing", flush=True)
    time.sleep(float(sys.argv[1]))
    con.execute("COMMIT")
    print("committed", flush=True)
    """
)


def test_cli_reads_at_once_while_a_writer_holds_a_transaction_open(seeded, capsys):
    writer = subprocess.Popen([sys.executable, "-c", HOLD_WRITE, "6"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        started = time.monotonic()
        out = run_json(capsys, "history")
        waited = time.monotonic() - started
        assert len(out["rows"]) == 3
        assert waited < 3.0, f"the read waited {waited:.1f}s for the writer"
        assert writer.poll() is None  # the writer's transaction was still open while we read
        assert writer.stdout.readline().strip() == "committed"
    finally:
        writer.wait(timeout=30)


HOLD_FILE = textwrap.dedent(
    """
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1])
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


def test_a_lock_error_names_the_process_that_holds_the_file(tmp_path):
    import duckdb

    from lorasum_assets.store.transactions import DatabaseBusyError, retry_busy

    path = tmp_path / "held.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FILE, str(path), "20"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        waits = []
        with pytest.raises(DatabaseBusyError) as error:
            retry_busy(lambda: duckdb.connect(str(path)), f"the file {path.name}", timeout_s=1.0, on_wait=waits.append)
        assert f"locked by process {holder.pid}" in str(error.value)
        assert "HOLD" not in str(error.value) and "python" in str(error.value)  # the holder's command line
        assert waits == []  # under 10 s: nothing to report yet
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_export_never_overwrites_without_force_and_names_an_unwritable_folder(seeded, capsys, tmp_path):
    target = tmp_path / "out"
    run_json(capsys, "export", "--out", str(target))
    before = (target / "eval_runs.parquet").stat().st_mtime_ns
    assert main(["export", "--out", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"lorasum export: 10 file(s) already in {target} (e.g. eval_runs.parquet); use --force to overwrite them"
    assert (target / "eval_runs.parquet").stat().st_mtime_ns == before
    assert run_json(capsys, "export", "--out", str(target), "--force")["rows"]

    # a folder nobody may create, even root (sysfs refuses new entries)
    assert main(["export", "--out", "/sys/lorasum-export"]) == 1
    assert capsys.readouterr().err.strip() == "lorasum export: cannot write to /sys/lorasum-export: Operation not permitted"
    (tmp_path / "a-file").write_text("x")
    assert main(["export", "--out", str(tmp_path / "a-file")]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err


def test_errors_are_json_under_json(seeded, capsys):
    assert main(["compare", "run-1", "nope", "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"error": "no evaluation run 'nope'", "exit_code": 1} and captured.err == ""


def test_a_closed_pipe_is_quiet(seeded):
    env = {**__import__("os").environ, "LORASUM_HOME": str(seeded)}
    # the reader goes away before the command prints (its imports alone take longer), as `| head` does
    process = subprocess.Popen([sys.executable, "-m", "lorasum_assets.tools.cli", "history", "--json"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 0
    assert stderr == ""


def test_read_only_commands_never_create_the_home(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-home-here"
    monkeypatch.setenv("LORASUM_HOME", str(missing))
    for command in (["history"], ["report"], ["adapters"]):
        assert main(command) == 1
        assert "no lorasum history" in capsys.readouterr().err
    assert not missing.exists()


def test_run_ids_are_accepted_by_unique_prefix(seeded, capsys):
    con = open_history(read_only=False)
    seed_run(con, "8f2c41d0-aaaa-4c1e-9d1b-000000000001", "2026-01-04 10:00:00", "ad4", 0.5, 0.6, {"a": (0.5, 0.6)})
    seed_run(con, "8f2c41d0-bbbb-4c1e-9d1b-000000000002", "2026-01-05 10:00:00", "ad5", 0.5, 0.7, {"a": (0.5, 0.7)})
    con.close()
    assert run_json(capsys, "report", "--run", "8f2c41d0-a")["run_id"] == "8f2c41d0-aaaa-4c1e-9d1b-000000000001"
    assert run_json(capsys, "compare", "8f2c41d0-a", "8f2c41d0-b")["run_b"] == "8f2c41d0-bbbb-4c1e-9d1b-000000000002"
    assert main(["report", "--run", "8f2c41d0"]) == 1  # the 8 characters the UI shows, but two runs share them
    assert "run id prefix '8f2c41d0' matches 2 runs" in capsys.readouterr().err


def test_every_option_has_help_and_shows_its_default(capsys):
    from lorasum_assets.tools.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"lorasum {name} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--help"])
    assert "(default: 1000)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["summarize", "--help"])
    summarize_help = " ".join(capsys.readouterr().out.split())
    assert "(default: standard input)" in summarize_help and "(default: production)" in summarize_help
    assert "(default: None)" not in summarize_help and "(default: False)" not in summarize_help


def test_commands_that_need_a_dagster_instance_say_so(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    grid = tmp_path / "grid.yaml"
    grid.write_text("lora_adapter:\n  learning_rate: [0.001]\n")
    for argv, message in ((["sweep", str(grid)], "lorasum sweep: set DAGSTER_HOME"),
                          (["recover"], "lorasum recover: set DAGSTER_HOME"),
                          (["init-instance"], "lorasum init-instance: DAGSTER_HOME is not set")):
        assert main(argv) == 1
        assert capsys.readouterr().err.startswith(message)


def test_a_bad_sweep_grid_names_the_file_and_the_field(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("lora_adapter:\n  learning_rat: [0.001]\n")
    assert main(["sweep", str(grid)]) == 1
    assert f"{grid}: 'learning_rat' is not a lora_adapter setting" in capsys.readouterr().err
    grid.write_text("lora_adapter:\n  epochs: [0, 1]\n")
    assert main(["sweep", str(grid)]) == 1
    assert "point {'epochs': 0}: TrainSpec.epochs = 0; must be >= 1" in capsys.readouterr().err
    grid.write_text("lora_adapter:\n  target_modules: [[q_proj], [all-linear, v_proj]]\n")
    assert main(["sweep", str(grid)]) == 1
    assert "all-linear already takes every linear layer: give it alone" in capsys.readouterr().err
    grid.write_text("lora_adapter:\n  epochs: [1]\n")
    assert main(["sweep", str(grid), "--data", str(tmp_path / "no-such-folder")]) == 1
    assert f"lorasum sweep: --data {tmp_path / 'no-such-folder'} does not exist" in capsys.readouterr().err


def test_lorasum_sql_runs_a_query_on_the_history_and_never_writes_it(seeded):
    sql = [sys.executable, "-m", "lorasum_assets.tools.cli", "sql", "--json", "-c"]
    done = subprocess.run([*sql, "SELECT count(*) AS runs FROM eval_runs"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"runs": 3}]
    views = subprocess.run([*sql, "SELECT (SELECT count(*) FROM eval_history) AS h, (SELECT count(*) FROM best_adapters) AS b, "
                                  "(SELECT count(*) FROM tuned_worse_examples) AS w, (SELECT count(*) FROM bertscore_report) AS r"],
                           capture_output=True, text=True, timeout=120)
    assert json.loads(views.stdout) == [{"h": 9, "b": 3, "w": 2, "r": 3}]
    mine = subprocess.run([*sql, "CREATE TABLE mine AS SELECT run_id FROM eval_runs; SELECT count(*) AS n FROM mine"],
                          capture_output=True, text=True, timeout=120)
    assert json.loads(mine.stdout) == [{"n": 3}]  # a table of the user's own, in the session's memory
    write = subprocess.run([*sql, "DELETE FROM eval_runs"], capture_output=True, text=True, timeout=120)
    assert write.returncode != 0 and "read-only" in (write.stdout + write.stderr).lower()
    assert json.loads(subprocess.run([*sql, "SELECT count(*) AS runs FROM eval_runs"], capture_output=True, text=True).stdout) == [{"runs": 3}]
    assert (seeded / "history" / "attach.sql").read_text().count("ATTACH") == 1  # for the plain DuckDB CLI too
