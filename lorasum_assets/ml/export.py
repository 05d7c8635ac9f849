"""Shipping an adapter: a merged model folder plain ``transformers`` loads, or the adapter with a
model card. No dagster.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel

from lorasum_assets.ml.generate import stop_token_ids
from lorasum_assets.ml.modeling import ModelSpec, load_model, load_tokenizer

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class MergedModel:
    folder: Path
    dequantized: bool
    dtype: str


def merge_adapter(spec: ModelSpec, adapter_path: str, out: Path) -> MergedModel:
    """Base + adapter merged with ``merge_and_unload`` into ``out``: safetensors weights, the
    tokenizer and a generation config whose stop ids are the ones lorasum generates with.

    A 4-bit base is dequantized first, so the LoRA weights merge into full-precision weights;
    the result is not bit-identical to the 4-bit model with the adapter applied.
    """
    base = load_model(spec)
    tokenizer = load_tokenizer(spec)
    dequantized = bool(getattr(base, "is_quantized", False) or getattr(base, "hf_quantizer", None))
    if dequantized:
        base = base.dequantize()
    merged = PeftModel.from_pretrained(base, adapter_path, is_trainable=False).merge_and_unload()
    merged.eval()
    stops = stop_token_ids(merged, tokenizer)
    merged.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    merged.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    merged.generation_config.do_sample = False
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return MergedModel(out, dequantized, str(next(merged.parameters()).dtype).replace("torch.", ""))


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
        f"library_name: {'transformers' if merged else 'peft'}",
        "pipeline_tag: text-generation",
        "tags: [lora, summarization, dialogsum, lorasum]",
        "---",
        "",
        f"# {facts['adapter_id']}",
        "",
        f"A LoRA adapter for dialogue summarization, trained by lorasum on `{facts['base_model']}`"
        + (" and merged into the base weights: load it with `AutoModelForCausalLM.from_pretrained`, no PEFT needed." if merged
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
