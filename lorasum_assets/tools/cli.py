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

from lorasum_assets.ml.stats import paired_bootstrap_ci, percent_difference
from lorasum_assets.runtime.home import home_path
from lorasum_assets.runtime.quiet import show_known_noise
from lorasum_assets.settings.env import DAGSTER_HOME_ENV, HF_TOKEN_ENV, get_env
from lorasum_assets.settings.specs import EVAL_METRICS, PRODUCTION_ALIAS
from lorasum_assets.store import queries
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
    matches = queries.evaluation_ids_starting(con, given)
    if given in matches:
        return given
    if not matches:
        raise SystemExit(f"no evaluation run {given!r}")
    if len(matches) > 1:
        raise SystemExit(f"run id prefix {given!r} matches {len(matches)} runs ({', '.join(m[:12] for m in matches[:5])}); give more characters")
    return matches[0]


def _latest_run(con) -> str:
    run_id = queries.latest_evaluation(con)
    if run_id is None:
        raise SystemExit("no evaluation runs yet")
    return run_id


def cmd_report(args: argparse.Namespace) -> int:
    con = _connect(args)
    run_id = _resolve_run(con, args.run) if args.run else _latest_run(con)
    run = queries.evaluation_summary(con, run_id)
    if run is None:
        raise SystemExit(f"no evaluation run {run_id!r}")
    rows = queries.report_table(con, run_id)
    header = ("metric", "base", "tuned", "delta", "delta_ci_low", "delta_ci_high")
    if args.json:
        _emit(args, header, rows, {"run_id": run_id})
        return 0
    print(f"run {run_id}  profile {run[0]}  model {run[1]}  {run[2]} {run[3]} dialogues  adapter {run[4]}")
    print(f"scorer {run[5]}")
    table = []
    for metric, base, tuned, delta, low, high in rows:
        table.append((metric, base, tuned, f"{delta:+.4f} [{low:+.4f}, {high:+.4f}]", percent_difference(base, tuned)))
    _print_table(["metric", "base", "tuned", "tuned - base (95% CI)", "% diff"], table)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    con = _connect(args)
    rows = queries.metric_history(con, args.metric, args.profile, args.last)
    header = ("created_at", "run_id", "profile", "adapter_id", "base", "tuned", "tuned_ci_low", "tuned_ci_high", "delta")
    if not args.json:
        print(f"{args.metric} (best over each dialogue's references; tuned CI: bootstrap 95%; delta = tuned - base)")
    _emit(args, header, rows, {"metric": args.metric})
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    con = _connect(args)
    run_a, run_b = _resolve_run(con, args.run_a), _resolve_run(con, args.run_b)
    hashes = queries.scorer_hashes(con, [run_a, run_b])
    if hashes[run_a] != hashes[run_b] and not args.force:
        raise SystemExit(
            f"the runs were scored differently ({hashes[run_a]} vs {hashes[run_b]}); "
            "their scores are not comparable (--force to show them anyway)"
        )
    metrics = []
    for model in ("base", "tuned"):
        for metric in EVAL_METRICS:
            pairs = queries.paired_example_scores(con, run_a, run_b, model, metric)
            if not pairs:
                continue
            a_values, b_values = [p[0] for p in pairs], [p[1] for p in pairs]
            change = paired_bootstrap_ci(b_values, a_values, n_resamples=args.resamples, seed=0)
            significant = "*" if change.low > 0 or change.high < 0 else ""
            metrics.append((model, metric, sum(a_values) / len(pairs), sum(b_values) / len(pairs), change.mean,
                            change.low, change.high, significant, len(pairs)))
    examples = queries.most_changed_examples(con, run_a, run_b, args.examples)
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


def _production_adapter(con, alias: str) -> tuple[str, str]:
    """The adapter holding ``alias``: on the profile's base model when several bases have one."""
    from lorasum_assets.settings.profiles import UnknownProfileError, get_profile
    from lorasum_assets.store.promotions import holders

    held = holders(con, alias)
    if not held:
        raise SystemExit(f"no adapter holds the {alias!r} alias yet; pass --adapter ID (`lorasum adapters` lists them)")
    try:
        profile_base = get_profile().model.model
    except UnknownProfileError:
        profile_base = None
    base_model, dataset, adapter_id, _ = ([h for h in held if h[0] == profile_base] or held)[0]
    return adapter_id, f"{alias} on {base_model} / {dataset}"


def cmd_summarize(args: argparse.Namespace) -> int:
    con = _connect(args)
    adapter_id, held_as = (args.adapter, None) if args.adapter else _production_adapter(con, args.alias)
    adapter = _verified_adapter(con, adapter_id)
    con.close()
    if held_as:
        print(f"lorasum summarize: using adapter {adapter_id} ({held_as})", file=sys.stderr)
    model = SummaryModel(args, adapter_id, adapter.base.model, adapter.base.revision, adapter.path, adapter.training)
    if args.input:
        return _summarize_file(args, model)
    dialogue = Path(args.file).read_text("utf-8") if args.file else sys.stdin.read()
    if not dialogue.strip():
        raise SystemExit("no dialogue given (use --file, --input or standard input)")
    with quiet_libraries(args.verbose):
        (output, truncated), = model.summarize([dialogue.strip()])
    if args.json:
        print(json.dumps({"adapter_id": adapter_id, "summary": output.text, "new_tokens": output.new_tokens,
                          "hit_limit": output.hit_limit, "prompt_truncated": truncated}))
    else:
        print(output.text)
    return 0


def read_dialogue_lines(path: Path) -> tuple[list[tuple[int, str, str]], list[tuple[int, str]]]:
    """(line, id, dialogue) of every usable line of a JSONL file, and (line, problem) of the others.
    A line is a JSON object with a non-empty string ``dialogue`` and an optional ``id``."""
    kept: list[tuple[int, str, str]] = []
    rejected: list[tuple[int, str]] = []
    for number, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
        if not line.strip():
            rejected.append((number, "empty line"))
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            rejected.append((number, f"not JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(value, dict):
            rejected.append((number, f"expected a JSON object with a 'dialogue' field, got {type(value).__name__}"))
        elif not isinstance(value.get("dialogue"), str) or not value["dialogue"].strip():
            rejected.append((number, "no 'dialogue' field with text" if "dialogue" not in value else "'dialogue' is empty or not text"))
        else:
            kept.append((number, str(value.get("id", f"line-{number}")), value["dialogue"].strip()))
    return kept, rejected


def _summarize_file(args: argparse.Namespace, model: SummaryModel) -> int:
    from tqdm import tqdm

    source, target = Path(args.input), Path(args.output) if args.output else None
    if target is None:
        raise SystemExit("--input needs --output FILE for the summaries")
    if not source.is_file():
        raise SystemExit(f"no input file {source}")
    items, rejected = read_dialogue_lines(source)
    for number, problem in rejected:
        print(f"lorasum summarize: {source} line {number}: {problem}", file=sys.stderr)
    results = []
    if items:
        with quiet_libraries(args.verbose) as terminal:
            bar = tqdm(total=len(items), desc="summaries", unit="dialogue", file=terminal, disable=args.json)
            try:
                results = model.summarize([d for _, _, d in items], on_batch=lambda done, _: bar.update(done - bar.n))
            finally:
                bar.close()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for (number, item_id, _), (output, truncated) in zip(items, results, strict=True):
            handle.write(json.dumps({"id": item_id, "line": number, "summary": output.text, "new_tokens": output.new_tokens,
                                     "hit_limit": output.hit_limit, "prompt_truncated": truncated}, ensure_ascii=False) + "\n")
    partial.replace(target)
    lines = [n for n, _ in rejected]
    message = f"{len(items)} summaries written to {target}; {len(rejected)} line(s) rejected" + (f" (lines {', '.join(map(str, lines))})" if lines else "")
    if args.json:
        print(json.dumps({"adapter_id": model.adapter_id, "written": len(items), "output": str(target),
                          "rejected": [{"line": n, "error": e} for n, e in rejected]}))
    else:
        print(message, file=sys.stderr)
    return 1 if rejected else 0


class SummaryModel:
    """The base model with one adapter applied, loaded on first use."""

    def __init__(self, args: argparse.Namespace, adapter_id: str, base_model: str, revision: str | None, path: str, trained: dict):
        self.args, self.adapter_id, self.path, self.trained = args, adapter_id, path, trained
        self.base_model, self.revision = base_model, revision

    def summarize(self, dialogues: list[str], on_batch=None) -> list[tuple]:
        from lorasum_assets.ml.generate import generate_with_adapter
        from lorasum_assets.ml.modeling import ModelSpec, load_model, load_tokenizer
        from lorasum_assets.ml.prompts import encode_prompt, trained_prompt_format
        from lorasum_assets.runtime.home import home_subdir
        from lorasum_assets.settings.specs import GenerationSpec

        quantization = self.trained.get("quantization", "none")
        spec = ModelSpec(model=self.base_model, revision=self.revision, quantization=quantization, cache_dir=str(home_subdir("models")))
        tokenizer = load_tokenizer(spec)
        use_chat_template, boundary = trained_prompt_format(self.trained)
        encoded = [encode_prompt(tokenizer, d, use_chat_template, self.args.max_prompt_tokens, boundary) for d in dialogues]
        model = load_model(spec)
        settings = GenerationSpec(max_new_tokens=self.args.max_new_tokens, batch_size=self.args.batch_size)
        try:
            outputs = generate_with_adapter(model, self.path, tokenizer, [p for p, _ in encoded], settings, on_batch)
        except Exception as exc:  # a corrupted adapter file fails here
            raise SystemExit(f"could not apply adapter {self.adapter_id!r} from {self.path}: {exc}") from exc
        return [(output, truncated) for output, (_, truncated) in zip(outputs, encoded, strict=True)]


def _checked_adapter(con, adapter_id: str):
    """The registered adapter after its weights are checked against the registry's sha256; raises
    ``AdapterFilesError`` (damaged or missing files) or ``LookupError`` (no such adapter)."""
    from lorasum_assets.ml.adapter_files import verify_adapter_files
    from lorasum_assets.store.registry import find_adapter

    adapter = find_adapter(con, adapter_id)
    if adapter is None:
        raise LookupError(f"no adapter with id {adapter_id!r}; `lorasum adapters` lists them")
    verify_adapter_files(adapter.adapter_id, adapter.path, adapter.sha256)
    return adapter


def _verified_adapter(con, adapter_id: str):
    """``_checked_adapter``, exiting with its message when the adapter cannot be used."""
    from lorasum_assets.ml.adapter_files import AdapterFilesError

    try:
        return _checked_adapter(con, adapter_id)
    except (AdapterFilesError, LookupError) as exc:
        raise SystemExit(str(exc)) from exc


def _alias_key(con, args: argparse.Namespace, adapter_id: str | None):
    from lorasum_assets.store.promotions import AliasKey, adapter_dataset, holders

    if adapter_id is not None:
        row = queries.adapter_location(con, adapter_id)
        if row is None:
            raise SystemExit(f"no adapter with id {adapter_id!r}; `lorasum adapters` lists them")
        dataset = args.dataset or adapter_dataset(con, adapter_id)
        if dataset is None:
            raise SystemExit(f"adapter {adapter_id} was never evaluated, so it has no dataset to hold {args.alias!r} on; evaluate it first")
        return AliasKey(args.alias, row[0], dataset)
    held = [h for h in holders(con, args.alias, args.base_model) if args.dataset in (None, h[1])]
    if not held:
        raise SystemExit(f"no adapter holds {args.alias!r}" + (f" on {args.base_model}" if args.base_model else ""))
    if len(held) > 1:
        keys = "; ".join(f"--base-model {b} --dataset {d}" for b, d, _, _ in held)
        raise SystemExit(f"{args.alias!r} is held on {len(held)} base models and datasets; name one: {keys}")
    return AliasKey(args.alias, held[0][0], held[0][1])


def _move(args: argparse.Namespace, adapter_id: str | None, rollback: bool) -> int:
    from lorasum_assets.ml.adapter_files import AdapterFilesError
    from lorasum_assets.store.lake import open_history
    from lorasum_assets.store.promotions import AliasError, current_adapter, move_alias

    _connect(args).close()
    con = open_history(read_only=False)
    try:
        key = _alias_key(con, args, adapter_id)
        before = current_adapter(con, key)
        try:
            row = move_alias(con, key, adapter_id, args.reason, rollback=rollback,
                             check_target=lambda target: _checked_adapter(con, target))
        except (AliasError, AdapterFilesError, LookupError) as exc:
            raise SystemExit(str(exc)) from exc
    finally:
        con.close()
    now = row["adapter_id"]
    if args.json:
        print(json.dumps({k: row[k] for k in ("promotion_id", "alias", "base_model", "dataset", "adapter_id", "previous_adapter_id",
                                              "decision", "reason")}, default=str))
    else:
        print(f"{key.describe()}: {before or 'no adapter'} -> {now or 'no adapter (the base model alone)'} ({row['reason']})")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    return _move(args, args.adapter, rollback=False)


def cmd_rollback(args: argparse.Namespace) -> int:
    return _move(args, None, rollback=True)


def cmd_export_model(args: argparse.Namespace) -> int:
    from lorasum_assets.ml.export import copy_adapter, merge_adapter, model_card
    from lorasum_assets.ml.modeling import ModelSpec
    from lorasum_assets.runtime.home import home_subdir
    from lorasum_assets.store.registry import adapter_facts

    con = _connect(args)
    adapter, facts = _verified_adapter(con, args.adapter), adapter_facts(con, args.adapter)
    con.close()
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise SystemExit(f"{out} exists and is not an empty folder; use --force to write into it")
    facts["merged"] = args.merged
    if args.merged:
        spec = ModelSpec(model=adapter.base.model, revision=adapter.base.revision, quantization=adapter.base.quantization,
                         device="cpu", cache_dir=str(home_subdir("models")))
        with quiet_libraries(args.verbose):
            merged = merge_adapter(spec, adapter.path, out)
        facts.update(dequantized=merged.dequantized, dtype=merged.dtype)
        message = f"merged {args.adapter} into {adapter.base.model} ({merged.dtype}) at {out}"
        if merged.dequantized:
            message += "; the 4-bit base was dequantized first, so the merged weights are not bit-identical to base + adapter"
    else:
        copy_adapter(adapter.path, out)
        message = f"exported adapter {args.adapter} to {out}"
    (out / "README.md").write_text(model_card(facts), encoding="utf-8")
    if args.push_to_hub:
        message += "; " + _push_to_hub(out, args.push_to_hub)
    if args.json:
        print(json.dumps({"adapter_id": args.adapter, "out": str(out), "merged": args.merged,
                          "dequantized": facts.get("dequantized", False), "files": sorted(p.name for p in out.iterdir())}))
    else:
        print(message)
    return 0


def _push_to_hub(folder: Path, repo: str) -> str:
    """Upload ``folder`` to the hub repository ``repo`` with ``HF_TOKEN``."""
    from huggingface_hub import HfApi

    token = get_env(HF_TOKEN_ENV)
    if not token:
        raise SystemExit("--push-to-hub needs a Hugging Face token in HF_TOKEN")
    api = HfApi(token=token)
    api.create_repo(repo, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="lorasum export-model")
    return f"pushed to https://huggingface.co/{repo} ({commit.oid[:12]})"


def cmd_adapters(args: argparse.Namespace) -> int:
    con = _connect(args)
    if args.verify:
        return _verify_adapters(args, con)
    if args.best:
        rows = queries.ranked_adapters(con, args.metric, args.last)
        _emit(args, ("rank", "adapter_id", args.metric, "ci_low", "ci_high", "run_id", "dataset_hash", "learning_rate", "lora_r"), rows)
        return 0
    rows = queries.adapter_listing(con)
    _emit(args, ("adapter_id", "created_at", "profile", "base_model", "final_train_loss", "final_val_loss", "aliases", "sha256"), rows)
    return 0


def _verify_adapters(args: argparse.Namespace, con) -> int:
    """Every registered adapter's files against its sha256: ok, damaged or missing; exit 1 unless all are ok."""
    from lorasum_assets.ml.adapter_files import AdapterFilesError, verify_adapter_files
    from lorasum_assets.store.registry import all_adapters

    rows = []
    for adapter in all_adapters(con):
        try:
            verify_adapter_files(adapter.adapter_id, adapter.path, adapter.sha256)
            rows.append((adapter.adapter_id, "ok", adapter.path, ""))
        except AdapterFilesError as exc:
            rows.append((adapter.adapter_id, exc.status, adapter.path, str(exc)))
    _emit(args, ("adapter_id", "status", "path", "problem"), rows)
    return 0 if all(row[1] == "ok" for row in rows) else 1


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
        written[table] = queries.export_table(con, table, out / f"{table}.{args.format}", args.format)
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
    from lorasum_assets.tools.sweep import SweepGridError, load_grid, run_sweep

    try:
        points = load_grid(args.grid)
    except SweepGridError as exc:
        raise SystemExit(f"lorasum sweep: {exc}") from exc
    result = run_sweep(points, parallel=args.parallel, metric=args.metric, log=lambda m: print(m, file=sys.stderr))
    _emit(args, result.header, result.rows, {"sweep": result.sweep_id, "metric": args.metric})
    return 0 if result.all_succeeded else 1


def _register_pending_adapters() -> list[tuple[str, str, int, str]]:
    """Adapters whose run saved them but could not register them (the history server was away)."""
    from lorasum_assets.store.lake import open_history
    from lorasum_assets.store.pending import pending_registrations, register_pending

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
            _print_table(adapter_header, adapters)
        print(f"{len(released)} dead run(s) failed and their pool slots freed:")
    _emit(args, ("run_id", "job_name", "pid"), [(r.run_id, r.job_name, r.pid) for r in released],
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


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default once: not when the help already says it, nor for flags and unset options."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Every command and option, declared in one place (long because it is a list, not logic)."""
    formatter = _DefaultsHelpFormatter
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
    p.add_argument("--metric", default="bertscore_f1", choices=EVAL_METRICS, help="the metric the base and tuned columns show")
    p.add_argument("--profile", help="only runs of this profile")

    p = command("compare", "per-metric changes between two runs, with paired CIs, and the examples that moved most", cmd_compare)
    p.add_argument("run_a", help="the earlier run: a Dagster run id or a unique prefix")
    p.add_argument("run_b", help="the later run: a Dagster run id or a unique prefix")
    p.add_argument("--examples", type=int, default=5, help="how many of the most-changed examples to show")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the paired CIs")
    p.add_argument("--force", action="store_true", help="compare even when the scorer differs")

    p = command("summarize", "summarize a dialogue (file or stdin), or a JSONL file of them, with the production adapter", cmd_summarize)
    p.add_argument("--adapter", help="adapter id (`lorasum adapters` lists them); default: the one holding --alias")
    p.add_argument("--alias", default=PRODUCTION_ALIAS, help="alias whose adapter to use when --adapter is not given")
    p.add_argument("--file", help="one dialogue as plain text (default: standard input)")
    p.add_argument("--input", help="JSONL file, one {\"dialogue\": ..., \"id\": ...} per line; needs --output")
    p.add_argument("--output", help="JSONL file for the summaries of --input, one per usable line")
    p.add_argument("--batch-size", type=int, default=8, help="dialogues per generation batch (--input)")
    p.add_argument("--max-new-tokens", type=int, default=150, help="new tokens at most")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="the dialogue is cut so the prompt fits")

    p = command("promote", "give an adapter an alias by hand (recorded in promotions)", cmd_promote)
    p.add_argument("adapter", help="adapter id")
    p.add_argument("--alias", default=PRODUCTION_ALIAS, help="the alias to move")
    p.add_argument("--dataset", help="dataset key (default: the dataset of the adapter's newest evaluation)")
    p.add_argument("--reason", help="why, for the record")

    p = command("rollback", "give an alias back to the adapter that held it before (recorded in promotions)", cmd_rollback)
    p.add_argument("--alias", default=PRODUCTION_ALIAS, help="the alias to move back")
    p.add_argument("--base-model", help="which base model's alias, when several hold one")
    p.add_argument("--dataset", help="which dataset's alias, when several hold one")
    p.add_argument("--reason", help="why, for the record")

    p = command("export-model", "export an adapter with a model card, or (--merged) a model plain transformers loads", cmd_export_model)
    p.add_argument("adapter", help="adapter id")
    p.add_argument("out", help="folder to write")
    p.add_argument("--merged", action="store_true", help="merge the LoRA weights into the base (merge_and_unload) and save the whole model")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hugging Face repository (reads HF_TOKEN)")
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty")

    p = command("adapters", "registered adapters", cmd_adapters)
    p.add_argument("--best", action="store_true", help="rank adapters by an evaluation metric (view best_adapters)")
    p.add_argument("--metric", default="bertscore_f1", choices=EVAL_METRICS, help="metric for --best")
    p.add_argument("-n", "--last", type=int, default=20, help="rows for --best")
    p.add_argument("--verify", action="store_true",
                   help="check every adapter's weights against the sha256 it was registered with: ok, damaged or missing (exit 1 unless all ok)")

    p = command("sweep", "train and evaluate every point of a YAML grid of lora_adapter settings", cmd_sweep)
    p.add_argument("grid", help="YAML file: lora_adapter: {setting: [values, ...]}")
    p.add_argument("--parallel", type=int, default=2, help="points running at once")
    p.add_argument("--metric", default="bertscore_f1", choices=EVAL_METRICS, help="metric that ranks the points")

    p = command("sql", "a DuckDB shell on the history (every table and view), or one query with -c", cmd_sql)
    p.add_argument("-c", dest="command_text", metavar="SQL", help="run this query and exit")

    command("recover", "register adapters a run saved but could not record (history server away); fail runs whose "
            "process died and free their GPU pool slots", cmd_recover)

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
    import) do not reach the terminal; errors still do, once the block has ended. Yields a stream
    to the terminal's stderr, for our own progress bars."""
    if verbose:
        show_known_noise()
        yield sys.stderr
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield terminal
    finally:
        terminal.close()
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
