"""The ``lorasum`` command: read the evaluation history in the DuckDB database."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lorasum_assets.home import database_path
from lorasum_assets.store.history import DatabaseBusyError, with_lock_retry


def _connect(read_only: bool = True, timeout_s: float = 30.0):
    import duckdb

    path = database_path()
    if not path.exists():
        raise SystemExit(f"no lorasum database at {path}; run the pipeline first (make demo)")
    return with_lock_retry(lambda: duckdb.connect(str(path), read_only=read_only), timeout_s)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    def fmt(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def cmd_report(args: argparse.Namespace) -> int:
    """The latest run's base-vs-tuned table (or a given run's)."""
    con = _connect()
    run_id = args.run or (con.execute("SELECT run_id FROM eval_runs ORDER BY created_at DESC LIMIT 1").fetchone() or [None])[0]
    if run_id is None:
        raise SystemExit("no evaluation runs yet")
    run = con.execute("SELECT profile, base_model, n_examples, split, adapter_id, scorer_hash FROM eval_runs WHERE run_id = ?", [run_id]).fetchone()
    rows = con.execute(
        """SELECT metric,
                  max(value) FILTER (WHERE model = 'base') AS base,
                  max(value) FILTER (WHERE model = 'tuned') AS tuned,
                  max(value) FILTER (WHERE model = 'delta') AS delta,
                  max(ci_low) FILTER (WHERE model = 'delta') AS delta_low,
                  max(ci_high) FILTER (WHERE model = 'delta') AS delta_high
           FROM eval_metrics WHERE run_id = ? AND reference_set = 'all'
           GROUP BY metric ORDER BY metric""",
        [run_id],
    ).fetchall()
    if args.json:
        keys = ("metric", "base", "tuned", "delta", "delta_ci_low", "delta_ci_high")
        print(json.dumps({"run_id": run_id, "metrics": [dict(zip(keys, r)) for r in rows]}, indent=2))
        return 0
    print(f"run {run_id}  profile {run[0]}  model {run[1]}  {run[2]} {run[3]} dialogues  adapter {run[4]}")
    print(f"scorer {run[5]}")
    table = []
    for metric, base, tuned, delta, low, high in rows:
        pct = f"{100 * (tuned - base) / base:+.2f}%" if base else "n/a"
        table.append((metric, base, tuned, f"{delta:+.4f} [{low:+.4f}, {high:+.4f}]", pct))
    _print_table(["metric", "base", "tuned", "tuned - base (95% CI)", "% diff"], table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorasum", description="Query the lorasum evaluation history.")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="base vs tuned scores of the latest (or a given) run")
    report.add_argument("--run", help="Dagster run id (default: the latest)")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DatabaseBusyError as exc:
        print(f"lorasum: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
