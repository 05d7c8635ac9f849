"""Model setup for training: LoRA wrapping, k-bit preparation, attention kernel, compilation."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from lorasum_assets.ml.models.four_bit import is_quantized
from lorasum_assets.ml.training.lora_dropout import lora_dropout_mask_for, use_packed_bits_dropout
from lorasum_assets.settings.specs import ALL_LINEAR, TrainSpec


def prepare_peft_model(model, spec: TrainSpec):
    """Wrap the base in LoRA. 4-bit bases go through ``prepare_model_for_kbit_training``."""
    checkpointing_kwargs = {"use_reentrant": False}
    use_attention(model, training_attention(model, spec.attention))
    if is_quantized(model):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif spec.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
        model.enable_input_require_grads()
    if spec.gradient_checkpointing:
        model.config.use_cache = False
    config = LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=lora_targets(spec.target_modules),
        bias=spec.bias,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(spec.seed)  # LoRA A matrices are randomly initialised: same seed, same start
    peft_model = get_peft_model(model, config)
    if lora_dropout_mask_for(peft_model, spec.lora_dropout_mask) == "packed_bits":
        use_packed_bits_dropout(peft_model)
    for _name, param in peft_model.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # adapters stay fp32 (fp16 adapters break the grad scaler)
    if spec.compile_layers:
        compile_decoder_layers(peft_model)
    return peft_model


def lora_targets(target_modules: tuple[str, ...]) -> str | list[str]:
    """What LoraConfig takes: PEFT's ``"all-linear"`` string, or the module names."""
    return ALL_LINEAR if tuple(target_modules) == (ALL_LINEAR,) else list(target_modules)


# Widest micro-batch (tokens per row) that trains faster with eager attention than with SDPA on CPU:
# eager's full attention matrices grow with the width squared. Measured per width by
# benchmarks/cost_growth.py; the figures are in docs/performance.md ("How cost grows").
CPU_EAGER_MAX_WIDTH = 512


def training_attention(model, attention: str = "auto", width: int | None = None) -> str:
    """The attention kernel to train a micro-batch of ``width`` tokens per row with.

    ``auto`` on CPU: eager up to ``CPU_EAGER_MAX_WIDTH`` tokens (slower with SDPA on DialogSum-sized
    batches, see docs/performance.md), SDPA above it. On GPUs the model keeps its own choice
    (SDPA/flash kernels win there).
    """
    if attention in ("sdpa", "eager"):
        return attention
    if attention != "auto":
        raise ValueError(f"attention must be auto, sdpa or eager, got {attention!r}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        return model.config._attn_implementation
    return "sdpa" if width is not None and width > CPU_EAGER_MAX_WIDTH else "eager"


def use_attention(model, attention: str) -> None:
    """Switch ``model`` (a PEFT wrapper or a plain model) to ``attention``; attention layers read the
    choice from the config on every forward, so this holds from the next forward on."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != attention:
        base.set_attn_implementation(attention)


def compile_decoder_layers(model) -> int:
    """``torch.compile`` every decoder layer in place, with dynamic shapes (batches vary in length).

    Layers rather than the whole model: the completion-only loss calls the decoder and the LM head
    separately, and a layer is the unit that repeats. Returns the number of layers compiled.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"compile_layers: {type(base).__name__} has no model.layers to compile")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
