"""The history store, measured.

    python -m benchmarks.store candidates   readers and writers at once, store candidates side by side
    python -m benchmarks.store cost         what the store costs a run, against the store it replaced

``python -m benchmarks.store COMMAND --help`` gives each one's options.

## candidates

Can a run write while a reader keeps a session open, and can several runs write at once?

    python -m benchmarks.store candidates --writes 30 --repeats 3

Candidates, each measured in fresh processes, interleaved:
- ``duckdb-file``: one DuckDB file, as lorasum kept it before (a reader opens it read-only);
- ``snapshot``: runs write a private DuckDB file and publish a copy by atomic rename after each
  write; readers open the published copy read-only;
- ``ducklake-sqlite``: a DuckLake with a SQLite catalog in WAL mode (what lorasum uses now).

Scenario A: one reader process opens a session, queries every 0.2 s and keeps it open; one writer
logs ``--writes`` training steps, each in its own transaction, the way a run does, over a history
that already holds ``--history-rows`` example rows. Scenario B: three writer processes at once, no
reader. Each write waits at most ``--give-up`` seconds. Prints per-write latency (median, p95,
max), writes that gave up, reader errors and how stale the reader's view was.

## cost

The tiny whole graph on the DuckLake store against the single-file DuckDB store it replaced, each
run in a fresh process and a fresh home, interleaved.

    python -m benchmarks.store cost --old d01011a --repeats 3

``--old`` is the git revision of the old store (checked out into a temporary worktree and put
first on PYTHONPATH; it needs ``dagster-duckdb``, in the ``bench`` extra). Prints wall time and
the peak RSS of the run's process, median (min-max), and the new/old ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

from benchmarks.common import ROOT, print_result, run_command, run_interleaved, run_whole_graph
from lorasum_assets.runtime.quiet import quiet_known_noise

CANDIDATES = ("duckdb-file", "snapshot", "ducklake-sqlite")
STEPS_DDL = "CREATE TABLE IF NOT EXISTS steps (run_id VARCHAR, step INTEGER, loss DOUBLE, logged_at TIMESTAMP)"
EXAMPLES_DDL = "CREATE TABLE IF NOT EXISTS examples (run_id VARCHAR, id VARCHAR, prediction VARCHAR)"


def _lake(folder: Path, read_only: bool):
    from lorasum_assets.store.lake import connect, history_location

    return connect(history_location(f"sqlite:{folder / 'catalog.sqlite'}"), read_only=read_only, timeout_s=0.01)


def open_writer(candidate: str, folder: Path):
    if candidate == "duckdb-file":
        return duckdb.connect(str(folder / "history.duckdb"))
    if candidate == "snapshot":
        return duckdb.connect(str(folder / "work.duckdb"))
    return _lake(folder, read_only=False)


def open_reader(candidate: str, folder: Path):
    if candidate == "duckdb-file":
        return duckdb.connect(str(folder / "history.duckdb"), read_only=True)
    if candidate == "snapshot":
        return duckdb.connect(str(folder / "published.duckdb"), read_only=True)
    return _lake(folder, read_only=True)


def publish(candidate: str, folder: Path, con) -> None:
    """The snapshot candidate: a consistent copy, renamed over the published one."""
    if candidate != "snapshot":
        return
    con.execute("CHECKPOINT")
    shutil.copyfile(folder / "work.duckdb", folder / "published.tmp")
    os.replace(folder / "published.tmp", folder / "published.duckdb")


def setup(candidate: str, folder: Path, history_rows: int) -> None:
    con = open_writer(candidate, folder)
    con.execute(STEPS_DDL)
    con.execute(EXAMPLES_DDL)
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")  # lorasum's readers look for it
    con.execute("INSERT INTO examples SELECT 'old-' || (i // 100), 'ex' || i, repeat('word ', 40) FROM range(?) t(i)", [history_rows])
    publish(candidate, folder, con)
    con.close()


def run_writer(candidate: str, folder: Path, run_id: str, writes: int, give_up: float) -> dict:
    latencies, gave_up, errors = [], 0, []
    for step in range(1, writes + 1):
        started = time.monotonic()
        while True:
            try:
                con = open_writer(candidate, folder)  # a run opened a connection per logged step
                try:
                    con.execute("BEGIN TRANSACTION")
                    con.execute("DELETE FROM steps WHERE run_id = ? AND step = ?", [run_id, step])
                    con.execute("INSERT INTO steps VALUES (?, ?, 1.0, now())", [run_id, step])
                    con.execute("COMMIT")
                    publish(candidate, folder, con)
                finally:
                    con.close()
                break
            except duckdb.Error as exc:
                if time.monotonic() - started > give_up:
                    gave_up += 1
                    errors.append(str(exc).splitlines()[0][:160])
                    break
                time.sleep(0.05)
        latencies.append(time.monotonic() - started)
        time.sleep(0.05)  # the training step between two logs
    return {"latencies": latencies, "gave_up": gave_up, "errors": errors[:2]}


def run_reader(candidate: str, folder: Path) -> dict:
    """Queries every 0.2 s on one session until the writer is done."""
    errors, queries, stale = [], 0, []
    con = None
    while not (folder / "done").exists():
        try:
            con = con or open_reader(candidate, folder)
            newest = con.execute("SELECT max(logged_at) FROM steps").fetchone()[0]
            queries += 1
            if newest is not None:
                stale.append(max(0.0, (time.time() - newest.timestamp())))
        except duckdb.Error as exc:
            errors.append(str(exc).splitlines()[0][:160])
            con = None
        time.sleep(0.2)
    return {"queries": queries, "errors": len(errors), "first_error": errors[0] if errors else None,
            "max_staleness_s": max(stale) if stale else None}


def worker(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"store-{args.worker}-"))
    try:
        setup(args.worker, folder, args.history_rows)
        script = [sys.executable, "-m", "benchmarks.store", "candidates", "--role"]
        reader = subprocess.Popen([*script, "reader", args.worker, str(folder)], stdout=subprocess.PIPE, text=True)
        time.sleep(2.0)  # the reader's session is open before the run starts logging
        alone = run_writer(args.worker, folder, "run-a", args.writes, args.give_up)
        (folder / "done").touch()
        read = json.loads(reader.communicate()[0].strip().splitlines()[-1])
        writers = [subprocess.Popen([*script, "writer", args.worker, str(folder), f"run-{i}", str(args.writes), str(args.give_up)],
                                    stdout=subprocess.PIPE, text=True) for i in range(3)]
        together = [json.loads(w.communicate()[0].strip().splitlines()[-1]) for w in writers]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"alone": alone, "reader": read, "three": together}


def describe(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p95 = ordered[int(0.95 * (len(ordered) - 1))]
    return f"{1000 * statistics.median(ordered):.0f} / {1000 * p95:.0f} / {1000 * ordered[-1]:.0f}"


def candidates(argv: list[str]) -> int:
    """History store candidates side by side: can a run write while a reader keeps a session open,
    and can several runs write at once?"""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store candidates", description=candidates.__doc__)
    parser.add_argument("--writes", type=int, default=30, help="training-step writes per writer")
    parser.add_argument("--history-rows", type=int, default=200_000, help="example rows already in the history")
    parser.add_argument("--give-up", type=float, default=2.0, help="seconds a write retries before it gives up")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every candidate, interleaved")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated, from " + ", ".join(CANDIDATES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        role, candidate, folder = args.role[0], args.role[1], Path(args.role[2])
        if role == "reader":
            print(json.dumps(run_reader(candidate, folder)))
        else:
            print(json.dumps(run_writer(candidate, folder, args.role[3], int(args.role[4]), float(args.role[5]))))
        return 0
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    chosen = args.candidates.split(",")
    passthrough = [f"--writes={args.writes}", f"--history-rows={args.history_rows}", f"--give-up={args.give_up}"]
    results = run_interleaved(__spec__.name, ["candidates", *passthrough], chosen, args.repeats,
                              describe=lambda r: f"gave up {r['alone']['gave_up']}, reader errors {r['reader']['errors']}")
    if results is None:
        return 1
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, duckdb {duckdb.__version__}; {args.writes} step writes per writer, "
          f"{args.history_rows:,} rows already in the history, a write gives up after {args.give_up:g} s; {args.repeats} repeats\n")
    print("| candidate | A: write ms with a reader open, median / p95 / max | A: writes that gave up | A: reader errors / queries "
          "| A: reader's view at most s behind | B: 3 writers at once, write ms median / p95 / max | B: writes that gave up |")
    print("|---|---|---|---|---|---|---|")
    for candidate in chosen:
        runs = results[candidate]
        alone = [x for r in runs for x in r["alone"]["latencies"]]
        three = [x for r in runs for w in r["three"] for x in w["latencies"]]
        gave_up = sum(r["alone"]["gave_up"] for r in runs)
        gave_up_three = sum(w["gave_up"] for r in runs for w in r["three"])
        errors = sum(r["reader"]["errors"] for r in runs)
        queries = sum(r["reader"]["queries"] for r in runs)
        stale = [r["reader"]["max_staleness_s"] for r in runs if r["reader"]["max_staleness_s"] is not None]
        print(f"| {candidate} | {describe(alone)} | {gave_up} of {len(alone)} | {errors} / {queries} | "
              f"{max(stale) if stale else float('nan'):.1f} | {describe(three)} | {gave_up_three} of {len(three)} |")
        first = next((r["reader"]["first_error"] for r in runs if r["reader"]["first_error"]), None)
        write_error = next((e for r in runs for e in r["alone"]["errors"]), None)
        for label, text in (("a reader error", first), ("a write that gave up", write_error)):
            if text:
                print(f"|   {label}: `{text}` | | | | | | |")
    return 0




def run_graph(tree: Path, models: Path) -> dict:
    seconds = run_whole_graph(tree, {"LORASUM_PROFILE": "tiny", "PYTHONPATH": str(tree)}, models=models)
    return {"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def cost(argv: list[str]) -> int:
    """What the history store costs a run: the tiny whole graph on the DuckLake store against the
    single-file DuckDB store it replaced."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store cost", description=cost.__doc__)
    parser.add_argument("--old", required=True, help="git revision whose store to measure against")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both variants, interleaved")
    parser.add_argument("--models", default=str(ROOT / ".lorasum" / "models"), help="model cache shared by every run (tiny model built once)")
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = Path(args.models)
    if args.worker:
        print_result(run_graph(Path(args.tree if args.worker == "old" else ROOT), models))
        return 0

    worktree = Path(tempfile.mkdtemp(prefix="lorasum-old-store-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.old], cwd=ROOT, check=True, capture_output=True)
    try:
        models.mkdir(parents=True, exist_ok=True)
        warm = run_graph(ROOT, models)  # builds the tiny model into the shared cache; not counted
        print(f"warm-up run (builds the tiny model once): {warm['seconds']:.1f} s", file=sys.stderr)
        results = run_interleaved(__spec__.name, ["cost", f"--old={args.old}", f"--models={models}", f"--tree={worktree}"], ["old", "new"],
                                  args.repeats, describe=lambda r: f"{r['seconds']:.1f} s, peak RSS {r['peak_mb']:.0f} MB")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(worktree, ignore_errors=True)
    if results is None:
        return 1

    def summary(variant: str, key: str) -> tuple[float, float, float]:
        values = [r[key] for r in results[variant]]
        return statistics.median(values), min(values), max(values)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; tiny profile, whole graph, fresh home per run; "
          f"{args.repeats} repeats interleaved, median (min-max)\n")
    print("| store | seconds | peak RSS of the run (MB) |\n|---|---|---|")
    for variant, label in (("old", f"single-file DuckDB ({args.old})"), ("new", "DuckLake, SQLite catalog")):
        s, m = summary(variant, "seconds"), summary(variant, "peak_mb")
        print(f"| {label} | {s[0]:.1f} ({s[1]:.1f}-{s[2]:.1f}) | {m[0]:,.0f} ({m[1]:,.0f}-{m[2]:,.0f}) |")
    time_ratio = summary("new", "seconds")[0] / summary("old", "seconds")[0]
    memory_ratio = summary("new", "peak_mb")[0] / summary("old", "peak_mb")[0]
    print(f"\nnew / old: time x{time_ratio:.3f}, peak RSS x{memory_ratio:.3f} (target: each at most x1.10)")
    return 0 if time_ratio <= 1.10 and memory_ratio <= 1.10 else 1



if __name__ == "__main__":
    quiet_known_noise()  # as every lorasum entry point does, before the libraries load
    sys.exit(run_command({"candidates": candidates, "cost": cost}, __doc__))
