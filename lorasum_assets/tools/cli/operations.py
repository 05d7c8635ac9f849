"""Operations: ``sweep`` (a grid of training settings), ``recover`` (after a crash or a server
outage) and ``init-instance``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorasum_assets.settings.env import DAGSTER_HOME_ENV, get_env
from lorasum_assets.settings.specs import EVAL_METRICS
from lorasum_assets.store.lake import open_history
from lorasum_assets.store.pending import pending_registrations, register_pending
from lorasum_assets.tools.cli.output import AddCommand, emit, print_table


def cmd_sweep(args: argparse.Namespace) -> int:
    from lorasum_assets.tools.sweep import SweepGridError, load_grid, run_sweep

    try:
        points = load_grid(args.grid)
    except SweepGridError as exc:
        raise SystemExit(f"lorasum sweep: {exc}") from exc
    if args.data and not Path(args.data).exists():
        raise SystemExit(f"lorasum sweep: --data {args.data} does not exist")
    data = str(Path(args.data).resolve()) if args.data else None
    result = run_sweep(points, parallel=args.parallel, metric=args.metric, data=data, log=lambda m: print(m, file=sys.stderr))
    emit(args, result.header, result.rows, {"sweep": result.sweep_id, "metric": args.metric})
    return 0 if result.all_succeeded else 1


def _register_pending_adapters() -> list[tuple[str, str, int, str]]:
    """Adapters whose run saved them but could not register them (the history server was away)."""
    if not pending_registrations():
        return []
    con = open_history(read_only=False)
    try:
        return register_pending(con)
    finally:
        con.close()


def cmd_recover(args: argparse.Namespace) -> int:
    import dagster as dg

    from lorasum_assets.runtime.dead_runs import release_dead_runs

    if not get_env(DAGSTER_HOME_ENV):
        raise SystemExit("lorasum recover: set DAGSTER_HOME to the Dagster instance whose runs to check")
    adapters = _register_pending_adapters()
    with dg.DagsterInstance.get() as instance:
        released = release_dead_runs(instance)
    adapter_header = ("adapter_id", "run_id", "steps", "outcome")
    if not args.json:
        print(f"{len(adapters)} adapter(s) saved by a run but not registered:")
        if adapters:
            print_table(adapter_header, adapters)
        print(f"{len(released)} dead run(s) failed and their pool slots freed:")
    emit(args, ("run_id", "job_name", "pid"), [(r.run_id, r.job_name, r.pid) for r in released],
          {"adapters": [dict(zip(adapter_header, a)) for a in adapters]})
    return 1 if any(outcome != "registered" for *_, outcome in adapters) else 0


def cmd_init_instance(args: argparse.Namespace) -> int:
    from lorasum_assets.runtime.instance import InstanceSetupError, init_instance

    try:
        home = init_instance(args.config)
    except InstanceSetupError as exc:
        raise SystemExit(f"lorasum init-instance: {exc}") from exc
    print(f"Dagster instance ready at {home}")
    return 0


def register(command: AddCommand) -> None:
    """Adds this module's commands to the parser."""
    p = command("sweep", "train and evaluate every point of a YAML grid of lora_adapter settings", cmd_sweep)
    p.add_argument("grid", help="YAML file: lora_adapter: {setting: [values, ...]}")
    p.add_argument("--parallel", type=int, default=2, help="points running at once")
    p.add_argument("--metric", default="bertscore_f1", choices=EVAL_METRICS, help="metric that ranks the points")
    p.add_argument("--data", help="a DialogSum file or folder (source 'local'; docs/data.md) to train and score on, "
                   "instead of the profile's data; the points are scored on its test split")

    command("recover", "register adapters a run saved but could not record (history server away); fail runs whose "
            "process died and free their GPU pool slots", cmd_recover)

    p = command("init-instance", "initialize the Dagster instance in DAGSTER_HOME once (safe to run concurrently)", cmd_init_instance, common=False)
    p.add_argument("--config", help="dagster.yaml to install when DAGSTER_HOME has none (e.g. deploy/dagster.yaml)")
