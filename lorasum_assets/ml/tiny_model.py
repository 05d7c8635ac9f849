"""A tiny random-init Llama and a BPE tokenizer trained on our own sample, for tests and smoke runs.

It is written to a folder and then loaded through ``from_pretrained`` like any hub model, so the
tests exercise the real loading path (4-bit NF4 included).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorasum_assets.ml.prompts import PROMPT_TEMPLATE

TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    # Wide enough an init that LoRA alone (lm_head is frozen) can move logits far: with the
    # default 0.02 the frozen lm_head caps how low the loss can go.
    "initializer_range": 0.2,
}
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def _corpus() -> list[str]:
    text = resources.files("lorasum_assets").joinpath("sample_data/dialogues.jsonl").read_text("utf-8")
    lines = []
    for line in text.splitlines():
        row = json.loads(line)
        lines.append(PROMPT_TEMPLATE.format(dialogue=row["dialogue"]) + row["summary"])
    return lines


def build_tiny_model(target: Path, vocab_size: int = 1024, seed: int = 0) -> Path:
    """Build (once) the tiny model and tokenizer into ``target``; returns ``target``."""
    target = Path(target)
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    bos_id = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=bos_id,
        eos_token_id=bpe.token_to_id("</s>"),
        pad_token_id=bpe.token_to_id("<pad>"),
        tie_word_embeddings=False,
        **TINY_CONFIG,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():  # another process did not win the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
