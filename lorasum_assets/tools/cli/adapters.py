"""Adapters and their aliases: ``promote``, ``rollback`` and ``export-model``, and the checks every
use of a registered adapter goes through (its files against the registry's sha256, its base model)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from lorasum_assets.ml.data.prompts import encode_prompts, trained_prompt_format
from lorasum_assets.ml.data.readers import read_sample
from lorasum_assets.ml.models.adapter_files import AdapterFilesError, verify_adapter_files
from lorasum_assets.runtime.models import base_model_spec
from lorasum_assets.runtime.quiet import quiet_libraries
from lorasum_assets.settings.env import HF_TOKEN_ENV, get_env
from lorasum_assets.settings.profiles import PROFILES
from lorasum_assets.settings.specs import PRODUCTION_ALIAS, ModelChoice
from lorasum_assets.store import queries
from lorasum_assets.store.aliases import AliasError, AliasKey, adapter_dataset, current_adapter, holders, move_alias
from lorasum_assets.store.lake import open_history
from lorasum_assets.store.registry import adapter_facts, adapter_profile, find_adapter
from lorasum_assets.tools.cli.output import AddCommand, connect


def checked_adapter(con, adapter_id: str):
    """The registered adapter after its weights are checked against the registry's sha256; raises
    ``AdapterFilesError`` (damaged or missing files) or ``LookupError`` (no such adapter)."""
    adapter = find_adapter(con, adapter_id)
    if adapter is None:
        raise LookupError(f"no adapter with id {adapter_id!r}; `lorasum adapters` lists them")
    verify_adapter_files(adapter.adapter_id, adapter.path, adapter.sha256)
    return adapter


def base_spec(con, adapter, device: str = "auto"):
    """How the adapter's base model loads: the model settings of the profile it was trained
    under, for the base the registry names (the model resource builds it the same way)."""
    profile = PROFILES.get(adapter_profile(con, adapter.adapter_id) or "")
    choice = replace(profile.model if profile else ModelChoice(), model=adapter.base.model, revision=adapter.base.revision,
                     quantization=adapter.base.quantization)
    return base_model_spec(choice, device=device, token=get_env(HF_TOKEN_ENV))


def verified_adapter(con, adapter_id: str):
    """``checked_adapter``, exiting with its message when the adapter cannot be used."""
    try:
        return checked_adapter(con, adapter_id)
    except (AdapterFilesError, LookupError) as exc:
        raise SystemExit(str(exc)) from exc


def _alias_key(con, args: argparse.Namespace, adapter_id: str | None):
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
    connect(args).close()
    con = open_history(read_only=False)
    try:
        key = _alias_key(con, args, adapter_id)
        before = current_adapter(con, key)
        try:
            row = move_alias(con, key, adapter_id, args.reason, rollback=rollback,
                             check_target=lambda target: checked_adapter(con, target))
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
    from lorasum_assets.ml.export.merged import MergeCheckError, copy_adapter, merge_adapter, model_card
    from lorasum_assets.ml.models.devices import take_peak_gpu_memory

    con = connect(args)
    adapter, facts = verified_adapter(con, args.adapter), adapter_facts(con, args.adapter)
    spec = base_spec(con, adapter, device=args.device)
    con.close()
    out = Path(args.out)
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and args.gguf:
        raise SystemExit(f"{out} exists and is not an empty folder; a GGUF export goes into a new folder (--force does not apply)")
    if occupied and not args.force:
        raise SystemExit(f"{out} exists and is not an empty folder; use --force to write into it")
    facts["merged"], facts["gguf"] = args.merged or args.gguf, args.gguf
    if args.gguf:
        message = _export_gguf(args, adapter, spec, out, facts)
    elif args.merged:
        with quiet_libraries(args.verbose):
            try:
                merged = merge_adapter(spec, adapter.path, out, check_prompts(spec, adapter.training), tolerance=args.merge_tolerance)
            except MergeCheckError as exc:
                raise SystemExit(f"lorasum export-model: {exc}") from exc
        facts.update(dequantized=merged.dequantized, dtype=merged.dtype)
        message = f"merged {args.adapter} into {adapter.base.model} ({merged.dtype}, on {merged.device}) at {out}"
        if merged.dequantized:
            message += "; the 4-bit base was dequantized first"
        message += f"\nchecked against base + adapter, reloaded with plain transformers: {merged.check.describe()}"
        if peak := take_peak_gpu_memory():
            message += f"\npeak GPU memory {peak['peak_gpu_memory_gib']} GiB"
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


def _export_gguf(args: argparse.Namespace, adapter, spec, out: Path, facts: dict) -> str:
    """model.gguf, adapter.gguf and the Ollama Modelfiles, checked by llama.cpp; the lines to print."""
    from lorasum_assets.ml.export.gguf import GgufExportError, GgufWriteError, export_gguf
    from lorasum_assets.ml.export.merged import MergeCheckError

    with quiet_libraries(args.verbose):
        try:
            done = export_gguf(spec, adapter.path, out, check_prompts(spec, adapter.training), out_type=args.type,
                               prompt_format=trained_prompt_format(adapter.training), merge_tolerance=args.merge_tolerance)
        except (GgufExportError, GgufWriteError, MergeCheckError) as exc:
            raise SystemExit(f"lorasum export-model: {exc}") from exc
    facts.update(dequantized=done.merged.dequantized, dtype=done.out_type)
    lines = [f"exported {args.adapter} on {adapter.base.model} as GGUF ({done.out_type}) at {out}: "
             + ", ".join(sorted(p.name for p in out.iterdir())),
             f"merged model checked against base + adapter, reloaded with plain transformers: {done.merged.check.describe()}",
             f"model.gguf checked in llama.cpp against base + adapter: {done.model_check.describe()}"]
    if done.adapter_check is not None:
        lines.append(f"adapter.gguf on the base GGUF checked in llama.cpp against base + adapter: {done.adapter_check.describe()}")
    else:
        lines.append("adapter.gguf not checked in llama.cpp: the base model is not a GGUF, so there is none to apply it to")
    return "\n".join(lines)


def check_prompts(spec, trained: dict, count: int = 8) -> list[list[int]]:
    """The first ``count`` test dialogues of the packaged sample, as prompts in the adapter's own format."""
    from lorasum_assets.ml.models.loading import load_tokenizer

    use_chat_template, boundary = trained_prompt_format(trained)
    dialogues = [row.values["dialogue"] for row in read_sample()["test"][:count]]
    encoded = encode_prompts(load_tokenizer(spec), dialogues, use_chat_template=use_chat_template, boundary=boundary, max_prompt_tokens=1024)
    return [ids for ids, _ in encoded]


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


def register(command: AddCommand) -> None:
    """Adds this module's commands to the parser."""
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

    p = command("export-model", "export an adapter with a model card, (--merged) a model plain transformers loads, or (--gguf) GGUF for llama.cpp and Ollama", cmd_export_model)
    p.add_argument("adapter", help="adapter id")
    p.add_argument("out", help="folder to write")
    p.add_argument("--merged", action="store_true", help="merge the LoRA weights into the base (merge_and_unload) and save the whole model")
    p.add_argument("--gguf", action="store_true",
                   help="GGUF for llama.cpp and Ollama: model.gguf (merged), adapter.gguf, Modelfile, checked by llama.cpp "
                        "(needs `make setup-gguf`; docs/export.md)")
    p.add_argument("--type", default="bf16", choices=("bf16", "f16", "q8_0"), help="the GGUF's weight type (--gguf)")
    p.add_argument("--merge-tolerance", type=float, default=0.02, metavar="GAP",
                   help="largest logit gap, as a share of the largest logit, a merged export may show against base + adapter "
                        "on 8 sample prompts (default: 0.02; docs/export.md)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where a merge loads, dequantizes and checks the model: auto is the GPU when there is one, else the CPU")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hugging Face repository (reads HF_TOKEN)")
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty")
