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
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lorasum_assets.ml.data.prompts import PROMPT_TEMPLATE

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


def _bpe_tokenizer(vocab_size: int, special_tokens: list[str], bos: str):
    bpe = Tokenizer(models.BPE(unk_token=special_tokens[0] if special_tokens[0] == "<unk>" else None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, bpe.token_to_id(bos))])
    return bpe


def _save_atomically(target: Path, save) -> Path:
    """``save(folder)`` into a staging folder renamed into place; a process that loses the race keeps the winner's."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():  # another process did not win the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_model(target: Path, vocab_size: int = 1024, seed: int = 0) -> Path:
    """Build (once) the tiny model and tokenizer into ``target``; returns ``target``."""
    target = Path(target)
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target

    bpe = _bpe_tokenizer(vocab_size, SPECIAL_TOKENS, "<s>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=bpe.token_to_id("<s>"),
        eos_token_id=bpe.token_to_id("</s>"),
        pad_token_id=bpe.token_to_id("<pad>"),
        tie_word_embeddings=False,
        **TINY_CONFIG,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)

    def save(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return _save_atomically(target, save)


# Llama 3's special tokens in Llama 3's order, and the three ids its Instruct models stop on.
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                         "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]
LLAMA3_STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama 3.2's rope scaling (config.json of meta-llama/Llama-3.2-3B-Instruct)
LLAMA32_ROPE_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
# What unsloth/Llama-3.2-3B-Instruct-bnb-4bit's config.json says under quantization_config
# (transformers' BitsAndBytesConfig.to_dict() with these settings).
UNSLOTH_BNB_4BIT = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                    "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8"}


# Llama 3.2 3B's shape, from meta-llama/Llama-3.2-3B-Instruct's config.json: the stand-in at real size
LLAMA32_3B_SHAPE = {
    "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5,
}


def build_tiny_llama32_bnb_4bit(target: Path, vocab_size: int = 1024, seed: int = 0, shape: dict | None = None,
                                device: str = "cpu") -> Path:
    """A stand-in for ``unsloth/Llama-3.2-3B-Instruct-bnb-4bit``, built (once) into ``target``: a
    2-layer Llama 3.2 (llama3 rope scaling, tied embeddings, grouped-query attention, Llama 3's
    special tokens, chat template and three stop ids), quantized NF4 with double quantization
    and saved prequantized, as unsloth's checkpoint is. Needs bitsandbytes (it runs on CPU).

    ``shape`` overrides the layer sizes (``LLAMA32_3B_SHAPE``: the real model's, with random
    weights; the tokenizer keeps its own small vocabulary inside the larger embedding), and
    ``device`` is where the weights are made and quantized (a GPU, for that size)."""
    target = Path(target)
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target

    bpe = _bpe_tokenizer(vocab_size, LLAMA3_SPECIAL_TOKENS, "<|begin_of_text|>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        pad_token="<|finetune_right_pad_id|>")
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    ids = {token: bpe.token_to_id(token) for token in LLAMA3_SPECIAL_TOKENS}
    stop_ids = [ids[token] for token in LLAMA3_STOP_TOKENS]
    sizes = {**TINY_CONFIG, "max_position_embeddings": 131072, "initializer_range": 0.02, "vocab_size": len(tokenizer), **(shape or {})}
    config = LlamaConfig(
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=stop_ids,
        pad_token_id=ids["<|finetune_right_pad_id|>"],
        tie_word_embeddings=True,
        rope_scaling=dict(LLAMA32_ROPE_SCALING),
        rope_theta=500000.0,
        # Llama 3.2's own init scale and context: logits of the size a real checkpoint gives
        **sizes,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        full = LlamaForCausalLM(config).to(torch.bfloat16)
    full.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=stop_ids, do_sample=True,
                                              temperature=0.6, top_p=0.9)

    def save(folder: Path) -> None:
        unquantized = folder / "unquantized"
        full.save_pretrained(unquantized, safe_serialization=True)
        quantization = BitsAndBytesConfig(**{**UNSLOTH_BNB_4BIT, "bnb_4bit_compute_dtype": torch.bfloat16})
        quantized = AutoModelForCausalLM.from_pretrained(unquantized, quantization_config=quantization, dtype=torch.bfloat16,
                                                         device_map={"": device})
        quantized.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        shutil.rmtree(unquantized)

    return _save_atomically(target, save)
