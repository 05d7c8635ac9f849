"""Shipping an adapter: a merged model folder plain ``transformers`` loads, or the adapter with a
model card. No dagster.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorasum_assets.ml.generation.generate import stop_token_ids
from lorasum_assets.ml.models.devices import free_accelerator_memory
from lorasum_assets.ml.models.four_bit import restore_4bit_layout
from lorasum_assets.ml.models.loading import ModelSpec, load_model, load_tokenizer, loaded_quantization, pick_device

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


# The largest logit gap a merged export may show against base + adapter, relative to the largest
# |logit| (docs/export.md has the measurement behind it), and how a parting of greedy paths is judged.
MERGE_TOLERANCE = 0.02
CHECK_NEW_TOKENS = 16


class MergeCheckError(RuntimeError):
    """The merged weights do not compute what base + adapter computes; nothing was kept."""


@dataclass(frozen=True)
class MergeCheck:
    """The export reloaded with plain ``transformers`` against base + adapter, on a few prompts:
    the reference's greedy path, the merged model's logits along it, and where its own greedy
    choice would part from it (with the reference's margin there: a near-tie is within tolerance)."""

    prompts: int
    same_greedy: int
    max_gap: float
    partings: list[dict]
    tolerance: float = MERGE_TOLERANCE

    @property
    def ok(self) -> bool:
        return self.max_gap <= self.tolerance and all(p["margin"] <= self.tolerance for p in self.partings)

    def describe(self) -> str:
        parts = "; ".join(f"prompt {p['prompt']} parts at new token {p['step']} where the top two logits of base + adapter "
                          f"are {p['margin']:.4f} apart (relative)" for p in self.partings)
        return (f"greedy outputs identical on {self.same_greedy} of {self.prompts} prompts"
                + (f" ({parts})" if parts else "")
                + f"; largest logit gap {self.max_gap:.4f} of the largest logit (tolerance {self.tolerance})")


@dataclass(frozen=True)
class MergedModel:
    folder: Path
    dequantized: bool
    dtype: str
    check: MergeCheck
    device: str


def export_dtype(base) -> torch.dtype:
    """The dtype the base computes in: a 4-bit base's compute dtype (bf16 or fp16 for a
    prequantized QLoRA checkpoint such as unsloth's, so the export is 16-bit, never fp32), an
    unquantized base's own dtype."""
    held = loaded_quantization(base)
    if held.method == "none" or not held.compute_dtype:
        return next(base.parameters()).dtype
    return getattr(torch, held.compute_dtype)


@torch.no_grad()
def greedy_path(model, prompt: list[int], new_tokens: int = CHECK_NEW_TOKENS) -> tuple[list[int], torch.Tensor]:
    """The greedy continuation of ``prompt`` (no stop id) and the logits of each step."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    steps, tokens = [out.logits[0, -1].float()], []
    for _ in range(new_tokens - 1):
        tokens.append(int(steps[-1].argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]], device=device), cache=out.cache, use_cache=True)
        steps.append(out.logits[0, -1].float())
    tokens.append(int(steps[-1].argmax()))
    return tokens, torch.stack(steps).cpu()


def judge_paths(paths: list[tuple[list[int], list[int], torch.Tensor]], candidate: list[torch.Tensor], tolerance: float) -> MergeCheck:
    """A candidate against the reference's greedy ``paths`` (prompt, tokens, logits of each step):
    ``candidate`` holds its logits at the same steps, teacher-forced, one tensor per path. Gaps and
    margins are relative to the reference's largest |logit| on that prompt."""
    same, gap, partings = 0, 0.0, []
    for index, ((_, tokens, ref_logits), ours) in enumerate(zip(paths, candidate, strict=True)):
        ours = ours.float()
        width = min(ours.shape[-1], ref_logits.shape[-1])  # a converter may pad the vocabulary
        ours, ref = ours[:, :width], ref_logits[:, :width]
        scale = ref.abs().max().item()
        gap = max(gap, (ours - ref).abs().max().item() / scale)
        chosen = ours.argmax(-1).tolist()
        parted = next((step for step, (a, b) in enumerate(zip(chosen, tokens, strict=True)) if a != b), None)
        if parted is None:
            same += 1
        else:
            margin = (ref[parted, tokens[parted]] - ref[parted, chosen[parted]]).item() / scale
            partings.append({"prompt": index, "step": parted + 1, "margin": margin})
    return MergeCheck(len(paths), same, gap, partings, tolerance)


@torch.no_grad()
def compare_with_reference(reference, merged, prompts: list[list[int]], new_tokens: int = CHECK_NEW_TOKENS,
                           tolerance: float = MERGE_TOLERANCE) -> MergeCheck:
    return compare_along([(prompt, *greedy_path(reference, prompt, new_tokens)) for prompt in prompts], merged, tolerance)


@torch.no_grad()
def compare_along(paths: list, merged, tolerance: float) -> MergeCheck:
    """``merged`` teacher-forced along the reference's greedy ``paths``, judged by ``judge_paths``."""
    device = next(merged.parameters()).device

    candidate = [merged(input_ids=torch.tensor([prompt + tokens[:-1]], device=device)).logits[0, len(prompt) - 1 :].float().cpu()
                 for prompt, tokens, _ in paths]
    return judge_paths(paths, candidate, tolerance)


def merge_adapter(spec: ModelSpec, adapter_path: str, out: Path, check_prompts: list[list[int]],
                  tolerance: float = MERGE_TOLERANCE, reference_paths: list | None = None) -> MergedModel:
    """Base + adapter merged with ``merge_and_unload`` into ``out``: safetensors weights in the
    dtype the base computes in (a 4-bit base is dequantized first), the tokenizer and a generation config whose stop ids are
    the ones lorasum generates with. The folder is written aside, reloaded with plain
    ``transformers`` and compared with base + adapter on ``check_prompts``; it is moved into place
    only when the comparison is within ``tolerance``, else nothing is left."""
    base = load_model(spec)
    tokenizer = load_tokenizer(spec)
    dtype = export_dtype(base)
    dequantized = loaded_quantization(base).method != "none"
    if dequantized:
        restore_4bit_layout(base)
        base = base.dequantize()
    merged = PeftModel.from_pretrained(base, adapter_path, is_trainable=False).merge_and_unload().to(dtype)
    merged.eval()
    stops = stop_token_ids(merged, tokenizer)
    merged.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    merged.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    merged.generation_config.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        setattr(merged.generation_config, key, None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        del merged, base
        free_accelerator_memory()  # the merged copy goes before its reload and a 4-bit reference load beside it
        device = pick_device(spec)
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=dtype).to(device).eval()
        if reference_paths is None:  # base + adapter's greedy paths, unless the caller already has them
            reference = PeftModel.from_pretrained(load_model(spec), adapter_path, is_trainable=False).eval()
            reference_paths = [(prompt, *greedy_path(reference, prompt)) for prompt in check_prompts]
            del reference
        check = compare_along(reference_paths, reloaded, tolerance)
        if not check.ok:
            raise MergeCheckError(f"the merged model does not compute what base + adapter computes: {check.describe()}; "
                                  f"nothing was written to {out}")
        out.mkdir(exist_ok=True)
        for item in staging.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return MergedModel(out, dequantized, str(dtype).replace("torch.", ""), check, device)


def copy_adapter(adapter_path: str, out: Path) -> None:
    """The adapter folder as training saved it: adapter weights, config and tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    for item in Path(adapter_path).iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)


def model_card(facts: dict[str, Any]) -> str:
    """A Hugging Face model card (README.md) for an exported adapter or merged model (long because
    it is the card's text, line by line)."""
    merged = facts["merged"]
    lines = [
        "---",
        f"base_model: {facts['base_model']}",
        f"library_name: {'gguf' if facts.get('gguf') else 'transformers' if merged else 'peft'}",
        "pipeline_tag: text-generation",
        "tags: [lora, summarization, dialogsum, lorasum]",
        "---",
        "",
        f"# {facts['adapter_id']}",
        "",
        f"A LoRA adapter for dialogue summarization, trained by lorasum on `{facts['base_model']}`"
        + (" and merged into the base weights, as GGUF: `llama-cli -m model.gguf`, or `ollama create NAME -f Modelfile`."
           if facts.get("gguf") else
           " and merged into the base weights: load it with `AutoModelForCausalLM.from_pretrained`, no PEFT needed." if merged
           else ": load it with `PeftModel.from_pretrained(base, folder)`."),
        "",
    ]
    if facts.get("dequantized"):
        lines += [
            "The base model is 4-bit (NF4). It was dequantized before merging, so these weights are "
            f"{facts.get('dtype', 'float')} and not bit-identical to the 4-bit base with the adapter applied.",
            "",
        ]
    lines += [
        "## Prompt",
        "",
        "```",
        "Summarize the following conversation.\\n\\n{dialogue}\\n\\nSummary:",
        "```",
        "",
        "## Training",
        "",
        f"- training data hash: `{facts.get('dataset_hash') or 'unknown'}`",
        f"- final train loss: {facts.get('final_train_loss')}, final validation loss: {facts.get('final_val_loss')}",
        f"- adapter weights sha256: `{facts['sha256']}`",
        "",
        "```json",
        json.dumps(facts.get("training", {}), indent=2, sort_keys=True),
        "```",
        "",
        "## Evaluation",
        "",
    ]
    metrics = facts.get("metrics") or []
    if metrics:
        lines += [
            f"Run `{facts['eval_run_id']}`, {facts['n_examples']} {facts['split']} dialogues of `{facts.get('dataset')}`, "
            "greedy decoding; 95% bootstrap CIs, the change paired per example.",
            "",
            "| metric | base | tuned | tuned − base |",
            "|---|---|---|---|",
        ]
        for m in metrics:
            lines.append(
                f"| {m['metric']} | {m['base']:.4f} | {m['tuned']:.4f} [{m['tuned_low']:.4f}, {m['tuned_high']:.4f}] "
                f"| {m['delta']:+.4f} [{m['delta_low']:+.4f}, {m['delta_high']:+.4f}] |"
            )
    else:
        lines.append("Not evaluated yet.")
    return "\n".join(lines) + "\n"
