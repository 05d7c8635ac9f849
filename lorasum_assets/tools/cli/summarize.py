"""``summarize``: a dialogue, or a JSONL file of them, summarized by the production adapter (or a
given one), through the same loading and generation functions the assets use."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from lorasum_assets.ml.data.prompts import encode_prompts, trained_prompt_format
from lorasum_assets.runtime.quiet import quiet_libraries
from lorasum_assets.settings.profiles import UnknownProfileError, get_profile
from lorasum_assets.settings.specs import PRODUCTION_ALIAS, GenerationSpec
from lorasum_assets.store.aliases import holders
from lorasum_assets.tools.cli.adapters import base_spec, verified_adapter
from lorasum_assets.tools.cli.output import AddCommand, connect


def _production_adapter(con, alias: str) -> tuple[str, str]:
    """The adapter holding ``alias``: on the profile's base model when several bases have one."""
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
    con = connect(args)
    adapter_id, held_as = (args.adapter, None) if args.adapter else _production_adapter(con, args.alias)
    adapter = verified_adapter(con, adapter_id)
    spec = base_spec(con, adapter)
    con.close()
    if held_as:
        print(f"lorasum summarize: using adapter {adapter_id} ({held_as})", file=sys.stderr)
    model = SummaryModel(args, adapter_id, spec, adapter.path, adapter.training)
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

    def __init__(self, args: argparse.Namespace, adapter_id: str, spec, path: str, trained: dict):
        self.args, self.adapter_id, self.spec, self.path, self.trained = args, adapter_id, spec, path, trained

    def summarize(self, dialogues: list[str], on_batch=None) -> list[tuple]:
        # torch, transformers and peft load only when there is something to summarize
        from lorasum_assets.ml.generation.generate import generate_with_adapter, prompt_budget
        from lorasum_assets.ml.models.loading import load_model, load_tokenizer

        tokenizer, model = load_tokenizer(self.spec), load_model(self.spec)
        settings = GenerationSpec(max_new_tokens=self.args.max_new_tokens, batch_size=self.args.batch_size,
                                  max_prompt_tokens=self.args.max_prompt_tokens)
        use_chat_template, boundary = trained_prompt_format(self.trained)
        encoded = encode_prompts(tokenizer, dialogues, use_chat_template=use_chat_template, boundary=boundary,
                                 max_prompt_tokens=prompt_budget(settings, model))
        try:
            outputs = generate_with_adapter(model, self.path, tokenizer, [p for p, _ in encoded], settings, on_batch)
        except Exception as exc:  # a corrupted adapter file fails here
            raise SystemExit(f"could not apply adapter {self.adapter_id!r} from {self.path}: {exc}") from exc
        return [(output, truncated) for output, (_, truncated) in zip(outputs, encoded, strict=True)]


def register(command: AddCommand) -> None:
    """Adds this module's commands to the parser."""
    p = command("summarize", "summarize a dialogue (file or stdin), or a JSONL file of them, with the production adapter", cmd_summarize)
    p.add_argument("--adapter", help="adapter id (`lorasum adapters` lists them); default: the one holding --alias")
    p.add_argument("--alias", default=PRODUCTION_ALIAS, help="alias whose adapter to use when --adapter is not given")
    p.add_argument("--file", help="one dialogue as plain text (default: standard input)")
    p.add_argument("--input", help="JSONL file, one {\"dialogue\": ..., \"id\": ...} per line; needs --output")
    p.add_argument("--output", help="JSONL file for the summaries of --input, one per usable line")
    p.add_argument("--batch-size", type=int, default=8, help="dialogues per generation batch (--input)")
    p.add_argument("--max-new-tokens", type=int, default=150, help="new tokens at most")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="the dialogue is cut so the prompt fits")
