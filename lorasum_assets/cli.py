"""The ``lorasum`` command: the evaluation history, run comparisons, summaries and exports.

Reads open the history (a DuckLake) read-only: they never wait for a run, nor a run for them.
``lorasum sql`` opens a DuckDB shell on it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from lorasum_assets.home import home_path
from lorasum_assets.store.history import DatabaseBusyError
from lorasum_assets.store.lake import HistoryNotFoundError, HistorySettingError, history_location, open_history, write_init_file
from lorasum_assets.store.schema import HISTORY_TABLES


def _connect(args: argparse.Namespace):
    try:
        return open_history(read_only=True)
    except (HistoryNotFoundError, HistorySettingError) as exc:
        raise SystemExit(str(exc)) from exc


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _emit(args: argparse.Namespace, header: Sequence[str], rows: Sequence[Sequence[object]], extra: dict | None = None) -> None:
    if args.json:
        payload = {**(extra or {}), "rows": [dict(zip(header, r)) for r in rows]}
        print(json.dumps(payload, indent=2, default=str))
    else:
        _print_table(header, rows)


def _resolve_run(con, given: str) -> str:
    """A full run id from a unique prefix of one (the UI shows the first 8 characters)."""
    matches = [r[0] for r in con.execute("SELECT run_id FROM eval_runs WHERE starts_with(run_id, ?) ORDER BY created_at", [given]).fetchall()]
    if given in matches:
        return given
    if not matches:
        raise SystemExit(f"no evaluation run {given!r}")
    if len(matches) > 1:
        raise SystemExit(f"run id prefix {given!r} matches {len(matches)} runs ({', '.join(m[:12] for m in matches[:5])}); give more characters")
    return matches[0]


def _latest_run(con) -> str:
    row = con.execute("SELECT run_id FROM eval_runs ORDER BY created_at DESC LIMIT 1").fetchone()
    if row is None:
        raise SystemExit("no evaluation runs yet")
    return row[0]


def cmd_report(args: argparse.Namespace) -> int:
    con = _connect(args)
    run_id = _resolve_run(con, args.run) if args.run else _latest_run(con)
    run = con.execute(
        "SELECT profile, base_model, n_examples, split, adapter_id, scorer_hash FROM eval_runs WHERE run_id = ?", [run_id]
    ).fetchone()
    if run is None:
        raise SystemExit(f"no evaluation run {run_id!r}")
    rows = con.execute(
        """SELECT metric,
                  max(value) FILTER (WHERE model = 'base'), max(value) FILTER (WHERE model = 'tuned'),
                  max(value) FILTER (WHERE model = 'delta'), max(ci_low) FILTER (WHERE model = 'delta'),
                  max(ci_high) FILTER (WHERE model = 'delta')
           FROM eval_metrics WHERE run_id = ? AND reference_set = 'all' GROUP BY metric ORDER BY metric""",
        [run_id],
    ).fetchall()
    header = ("metric", "base", "tuned", "delta", "delta_ci_low", "delta_ci_high")
    if args.json:
        _emit(args, header, rows, {"run_id": run_id})
        return 0
    print(f"run {run_id}  profile {run[0]}  model {run[1]}  {run[2]} {run[3]} dialogues  adapter {run[4]}")
    print(f"scorer {run[5]}")
    table = []
    for metric, base, tuned, delta, low, high in rows:
        pct = f"{100 * (tuned - base) / base:+.2f}%" if base else "n/a"
        table.append((metric, base, tuned, f"{delta:+.4f} [{low:+.4f}, {high:+.4f}]", pct))
    _print_table(["metric", "base", "tuned", "tuned - base (95% CI)", "% diff"], table)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    con = _connect(args)
    query = """
        SELECT created_at, run_id, profile, adapter_id,
               max(value) FILTER (WHERE model = 'base') AS base,
               max(value) FILTER (WHERE model = 'tuned') AS tuned,
               max(ci_low) FILTER (WHERE model = 'tuned') AS tuned_ci_low,
               max(ci_high) FILTER (WHERE model = 'tuned') AS tuned_ci_high,
               max(value) FILTER (WHERE model = 'delta') AS delta
        FROM eval_history WHERE metric = ? AND reference_set = 'all'"""
    params: list = [args.metric]
    if args.profile:
        query += " AND profile = ?"
        params.append(args.profile)
    query += " GROUP BY ALL ORDER BY created_at DESC LIMIT ?"
    params.append(args.last)
    rows = con.execute(query, params).fetchall()
    header = ("created_at", "run_id", "profile", "adapter_id", "base", "tuned", "tuned_ci_low", "tuned_ci_high", "delta")
    _emit(args, header, rows, {"metric": args.metric})
    return 0


EXAMPLE_METRICS = ("bertscore_precision", "bertscore_recall", "bertscore_f1", "rouge1", "rouge2", "rougeL", "rougeLsum")


def cmd_compare(args: argparse.Namespace) -> int:
    from lorasum_assets.ml.metrics import paired_bootstrap_ci

    con = _connect(args)
    run_a, run_b = _resolve_run(con, args.run_a), _resolve_run(con, args.run_b)
    hashes = dict(con.execute("SELECT run_id, scorer_hash FROM eval_runs WHERE run_id IN (?, ?)", [run_a, run_b]).fetchall())
    if hashes[run_a] != hashes[run_b] and not args.force:
        raise SystemExit(
            f"the runs were scored differently ({hashes[run_a]} vs {hashes[run_b]}); "
            "their scores are not comparable (--force to show them anyway)"
        )
    metrics = []
    for model in ("base", "tuned"):
        for metric in EXAMPLE_METRICS:
            pairs = con.execute(
                f"""SELECT a.{metric}, b.{metric} FROM eval_examples a JOIN eval_examples b USING (id, model)
                    WHERE a.run_id = ? AND b.run_id = ? AND a.model = ? ORDER BY id""",
                [run_a, run_b, model],
            ).fetchall()
            if not pairs:
                continue
            a_values, b_values = [p[0] for p in pairs], [p[1] for p in pairs]
            change = paired_bootstrap_ci(b_values, a_values, n_resamples=args.resamples, seed=0)
            significant = "*" if change.low > 0 or change.high < 0 else ""
            metrics.append((model, metric, sum(a_values) / len(pairs), sum(b_values) / len(pairs), change.mean,
                            change.low, change.high, significant, len(pairs)))
    examples = con.execute(
        """SELECT a.id, a.bertscore_f1, b.bertscore_f1, b.bertscore_f1 - a.bertscore_f1 AS change, a.prediction, b.prediction
           FROM eval_examples a JOIN eval_examples b USING (id, model)
           WHERE a.run_id = ? AND b.run_id = ? AND a.model = 'tuned'
           ORDER BY abs(change) DESC LIMIT ?""",
        [run_a, run_b, args.examples],
    ).fetchall()
    metric_header = ("model", "metric", "run_a", "run_b", "change", "ci_low", "ci_high", "significant", "examples")
    example_header = ("id", "f1_a", "f1_b", "change", "prediction_a", "prediction_b")
    if args.json:
        print(json.dumps({"run_a": run_a, "run_b": run_b,
                          "metrics": [dict(zip(metric_header, r)) for r in metrics],
                          "examples": [dict(zip(example_header, r)) for r in examples]}, indent=2, default=str))
        return 0
    print(f"{run_a} -> {run_b}: change = run_b - run_a on the examples both scored, paired bootstrap 95% CI; * = the CI excludes 0")
    _print_table(metric_header, metrics)
    print(f"\ntuned examples that changed most (BERTScore F1), {run_a[:8]} -> {run_b[:8]}:")
    _print_table(example_header, [(i, a, b, c, pa[:60], pb[:60]) for i, a, b, c, pa, pb in examples])
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    con = _connect(args)
    row = con.execute("SELECT base_model, base_revision, config, path FROM adapters WHERE adapter_id = ?", [args.adapter]).fetchone()
    con.close()
    if row is None:
        raise SystemExit(f"no adapter with id {args.adapter!r}; `lorasum adapters` lists them")
    base_model, revision, config, path = row
    if not Path(path, "adapter_model.safetensors").exists():
        raise SystemExit(f"adapter {args.adapter!r} is registered but its files are missing at {path}")
    dialogue = Path(args.file).read_text("utf-8") if args.file else sys.stdin.read()
    if not dialogue.strip():
        raise SystemExit("no dialogue given (use --file or standard input)")
    with quiet_libraries(args.verbose):
        output, truncated = _summarize(args, base_model, revision, path, dialogue.strip(), json.loads(config))
    if args.json:
        print(json.dumps({"adapter_id": args.adapter, "summary": output.text, "new_tokens": output.new_tokens,
                          "hit_limit": output.hit_limit, "prompt_truncated": truncated}))
    else:
        print(output.text)
    return 0


def _summarize(args: argparse.Namespace, base_model: str, revision: str | None, path: str, dialogue: str, trained: dict):
    from lorasum_assets.home import home_subdir
    from lorasum_assets.ml.generate import generate_with_adapter
    from lorasum_assets.ml.modeling import ModelSpec, load_model, load_tokenizer
    from lorasum_assets.ml.prompts import encode_prompt, trained_prompt_format
    from lorasum_assets.ml.specs import GenerationSpec

    quantization = trained.get("quantization", "none")
    spec = ModelSpec(model=base_model, revision=revision, quantization=quantization, cache_dir=str(home_subdir("models")))
    tokenizer = load_tokenizer(spec)
    use_chat_template, boundary = trained_prompt_format(trained)
    prompt, truncated = encode_prompt(tokenizer, dialogue, use_chat_template, args.max_prompt_tokens, boundary)
    model = load_model(spec)
    try:
        output = generate_with_adapter(model, path, tokenizer, [prompt], GenerationSpec(max_new_tokens=args.max_new_tokens, batch_size=1))[0]
    except Exception as exc:  # a corrupted adapter file fails here
        raise SystemExit(f"could not apply adapter {args.adapter!r} from {path}: {exc}") from exc
    return output, truncated


def cmd_adapters(args: argparse.Namespace) -> int:
    con = _connect(args)
    if args.best:
        rows = con.execute(
            """SELECT b.rank, b.adapter_id, b.value, b.ci_low, b.ci_high, b.run_id, b.dataset_hash, a.config->>'learning_rate', a.config->>'lora_r'
               FROM best_adapters b LEFT JOIN adapters a USING (adapter_id)
               WHERE b.metric = ? AND b.reference_set = 'all' ORDER BY b.dataset_hash, b.scorer_hash, b.rank LIMIT ?""",
            [args.metric, args.last],
        ).fetchall()
        _emit(args, ("rank", "adapter_id", args.metric, "ci_low", "ci_high", "run_id", "dataset_hash", "learning_rate", "lora_r"), rows)
        return 0
    rows = con.execute(
        "SELECT adapter_id, created_at, profile, base_model, final_train_loss, final_val_loss, sha256 FROM adapters ORDER BY created_at DESC"
    ).fetchall()
    _emit(args, ("adapter_id", "created_at", "profile", "base_model", "final_train_loss", "final_val_loss", "sha256"), rows)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    con = _connect(args)
    out = Path(args.out)
    targets = [out / f"{table}.{args.format}" for table in HISTORY_TABLES]
    if out.exists() and not out.is_dir():
        raise SystemExit(f"lorasum export: {out} exists and is not a folder")
    existing = [t for t in targets if t.exists()]
    if existing and not args.force:
        raise SystemExit(f"lorasum export: {len(existing)} file(s) already in {out} (e.g. {existing[0].name}); use --force to overwrite them")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lorasum-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SystemExit(f"lorasum export: cannot write to {out}: {exc.strerror or exc}") from exc
    written = {}
    for table in tqdm(HISTORY_TABLES, desc="export", disable=args.json or not sys.stderr.isatty(), file=sys.stderr):
        target = out / f"{table}.{args.format}"
        option = "(FORMAT parquet)" if args.format == "parquet" else "(FORMAT csv, HEADER)"
        quoted = target.as_posix().replace("'", "''")
        con.execute(f"COPY (SELECT * FROM {table}) TO '{quoted}' {option}")
        written[table] = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    _emit(args, ("table", "rows", "file"), [(t, n, str(out / f"{t}.{args.format}")) for t, n in written.items()])
    return 0


def duckdb_cli() -> str:
    """The DuckDB shell installed with lorasum (PyPI ``duckdb-cli``, the same DuckDB version)."""
    import shutil

    beside = Path(sys.executable).parent / "duckdb"
    found = str(beside) if beside.exists() else shutil.which("duckdb")
    if not found:
        raise SystemExit("lorasum sql: the DuckDB shell is not installed (pip install duckdb-cli)")
    return found


def cmd_sql(args: argparse.Namespace) -> int:
    """A DuckDB shell on the history, read-only; tables of your own go to the session's memory."""
    _connect(args).close()  # the same checks and messages as every other command
    init = write_init_file(history_location(), home_path() / "history" / "attach.sql")
    command = [duckdb_cli(), "-init", str(init)]
    if args.command_text is not None:
        command += ["-c", args.command_text]
    if args.json and args.command_text is not None:
        command.insert(1, "-json")
    sys.stdout.flush()
    os.execv(command[0], command)


def cmd_sweep(args: argparse.Namespace) -> int:
    from lorasum_assets.sweep import SweepGridError, load_grid
    from lorasum_assets.sweep_runner import run_sweep

    try:
        points = load_grid(args.grid)
    except SweepGridError as exc:
        raise SystemExit(f"lorasum sweep: {exc}") from exc
    result = run_sweep(points, parallel=args.parallel, metric=args.metric, log=lambda m: print(m, file=sys.stderr))
    _emit(args, result.header, result.rows, {"sweep": result.sweep_id, "metric": args.metric})
    return 0 if result.all_succeeded else 1


def cmd_recover(args: argparse.Namespace) -> int:
    import dagster as dg

    from lorasum_assets.recovery import release_dead_runs

    if not os.environ.get("DAGSTER_HOME"):
        raise SystemExit("lorasum recover: set DAGSTER_HOME to the Dagster instance whose runs to check")
    with dg.DagsterInstance.get() as instance:
        released = release_dead_runs(instance)
    _emit(args, ("run_id", "job_name", "pid"), [(r.run_id, r.job_name, r.pid) for r in released])
    return 0


def cmd_init_instance(args: argparse.Namespace) -> int:
    from lorasum_assets.instance import InstanceSetupError, init_instance

    try:
        home = init_instance(args.config)
    except InstanceSetupError as exc:
        raise SystemExit(f"lorasum init-instance: {exc}") from exc
    print(f"Dagster instance ready at {home}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="lorasum", description="Query the lorasum evaluation history (a DuckLake: LORASUM_HISTORY, default under LORASUM_HOME).", formatter_class=formatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output (errors too)")
    common.add_argument("-v", "--verbose", action="store_true", help="show the libraries' own progress bars and warnings")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, func, parents=(common,)):
        p = sub.add_parser(name, parents=list(parents), help=help_text, description=help_text, formatter_class=formatter)
        p.set_defaults(func=func)
        return p

    p = command("report", "base vs tuned scores of the latest (or a given) run", cmd_report)
    p.add_argument("--run", help="Dagster run id or a unique prefix of one (default: the latest run)")

    p = command("history", "the last N evaluation runs for one metric, with CIs", cmd_history)
    p.add_argument("-n", "--last", type=int, default=10, help="how many runs")
    p.add_argument("--metric", default="bertscore_f1", help="bertscore_precision/recall/f1, rouge1/2/L/Lsum")
    p.add_argument("--profile", help="only runs of this profile")

    p = command("compare", "per-metric changes between two runs, with paired CIs, and the examples that moved most", cmd_compare)
    p.add_argument("run_a", help="the earlier run: a Dagster run id or a unique prefix")
    p.add_argument("run_b", help="the later run: a Dagster run id or a unique prefix")
    p.add_argument("--examples", type=int, default=5, help="how many of the most-changed examples to show")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the paired CIs")
    p.add_argument("--force", action="store_true", help="compare even when the scorer differs")

    p = command("summarize", "summarize a dialogue (file or stdin) with a registered adapter", cmd_summarize)
    p.add_argument("--adapter", required=True, help="adapter id (`lorasum adapters` lists them)")
    p.add_argument("--file", help="dialogue file (default: standard input)")
    p.add_argument("--max-new-tokens", type=int, default=150, help="new tokens at most")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="the dialogue is cut so the prompt fits")

    p = command("adapters", "registered adapters", cmd_adapters)
    p.add_argument("--best", action="store_true", help="rank adapters by an evaluation metric (view best_adapters)")
    p.add_argument("--metric", default="bertscore_f1", help="metric for --best")
    p.add_argument("-n", "--last", type=int, default=20, help="rows for --best")

    p = command("sweep", "train and evaluate every point of a YAML grid of lora_adapter settings", cmd_sweep)
    p.add_argument("grid", help="YAML file: lora_adapter: {setting: [values, ...]}")
    p.add_argument("--parallel", type=int, default=2, help="points running at once")
    p.add_argument("--metric", default="bertscore_f1", help="metric that ranks the points")

    p = command("sql", "a DuckDB shell on the history (every table and view), or one query with -c", cmd_sql)
    p.add_argument("-c", dest="command_text", metavar="SQL", help="run this query and exit")

    command("recover", "fail runs whose process died and free their GPU pool slots", cmd_recover)

    p = command("init-instance", "initialize the Dagster instance in DAGSTER_HOME once (safe to run concurrently)", cmd_init_instance, ())
    p.add_argument("--config", help="dagster.yaml to install when DAGSTER_HOME has none (e.g. deploy/dagster.yaml)")

    p = command("export", "export the history tables to Parquet or CSV", cmd_export)
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet", help="file format")
    p.add_argument("--out", default="lorasum-export", help="folder for the files")
    p.add_argument("--force", action="store_true", help="overwrite files an earlier export left there")
    return parser


@contextlib.contextmanager
def quiet_libraries(verbose: bool):
    """Without -v, the libraries' progress bars, warnings and notices (bitsandbytes prints one at
    import) do not reach the terminal; errors still do, once the block has ended."""
    if verbose:
        yield
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    """One line on stderr, or a JSON object on stdout under --json."""
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "exit_code": code}))
    else:
        print(message if message.startswith("lorasum") else f"lorasum: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DatabaseBusyError as exc:
        return _fail(args, str(exc), 3)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            return _fail(args, exc.code, 1)
        raise
    except BrokenPipeError:
        # The reader went away (`lorasum report --json | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
