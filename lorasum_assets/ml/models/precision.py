"""Precision: the autocast dtype for training and frozen base weights stored in it."""

from __future__ import annotations

import contextlib

import torch

from lorasum_assets.ml.models.devices import cpu_model_and_flags, cuda_has_native_bf16
from lorasum_assets.ml.models.four_bit import is_quantized


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run about twice as fast as fp32 on this CPU."""
    flags = cpu_model_and_flags()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_autocast_dtype(model, mixed_precision: str = "auto"):
    """The autocast dtype for training; adapters themselves stay fp32.

    ``auto``: bf16 on GPUs that have it in hardware, fp16 (with the grad scaler) on older GPUs, bf16 on CPUs with native bf16
    (faster per step at the same loss; figures in docs/performance.md), else fp32.
    """
    return autocast_dtype_on(next(model.parameters()).device.type, mixed_precision)


def autocast_dtype_on(device_type: str, mixed_precision: str = "auto"):
    """``training_autocast_dtype`` for a model on ``device_type`` (``cpu``, ``cuda``), known before it loads."""
    if mixed_precision == "no":
        return None
    if mixed_precision in ("bf16", "fp16"):
        return torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    if mixed_precision != "auto":
        raise ValueError(f"mixed_precision must be auto, bf16, fp16 or no, got {mixed_precision!r}")
    if device_type != "cuda":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return torch.bfloat16 if cuda_has_native_bf16() else torch.float16


def precision_name(dtype) -> str:
    """``bf16``, ``fp16`` or ``fp32`` (no autocast), as runs record it."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def autocast_cast_weights(model) -> list:
    """The frozen fp32 weights that autocast would cast to the low-precision dtype on every forward:
    those of Linear layers. Embeddings and norms are not cast by autocast and stay fp32 (so the
    residual stream stays fp32), and a Linear weight shared with an embedding (a tied LM head) is
    left alone too."""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    chosen, seen = [], set()
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        if weight.requires_grad or weight.dtype != torch.float32 or id(weight) in embedding_params or id(weight) in seen:
            continue
        seen.add(id(weight))
        chosen.append(weight)
    return chosen


@contextlib.contextmanager
def frozen_weights_in(model, dtype):
    """Store the frozen fp32 Linear weights in ``dtype`` while the block runs, then put the originals back.

    Under autocast every forward casts them to ``dtype`` again; casting once gives the same rounded
    values without the per-step cost (SmolLM2-135M, CPU bf16: keeping them fp32 trains at 0.91x;
    benchmarks/speed.py). Only the weights autocast itself would cast are stored this way
    (``autocast_cast_weights``), so the numbers equal autocast's; the model leaves the block with
    its own fp32 weights, so only the LoRA weights have changed.
    """
    chosen = autocast_cast_weights(model) if dtype in (torch.bfloat16, torch.float16) and not is_quantized(model) else []
    with _held_in(chosen, dtype) as count:
        yield count


def generation_dtype(model, precision: str = "auto"):
    """The dtype to hold the weights in while generating, or None to keep them as loaded.

    ``auto``: bf16 for an fp32 model on a CPU with native bf16 (decoding on CPU is bound by reading
    the weights, so half the bytes is about twice the speed); a GPU model is already loaded in its
    compute dtype, and a 4-bit model keeps its own.
    """
    if precision not in ("auto", "bf16", "as_loaded"):
        raise ValueError(f"precision must be auto, bf16 or as_loaded, got {precision!r}")
    if precision == "as_loaded" or is_quantized(model):
        return None
    parameter = next(model.parameters())
    if precision == "bf16":
        return torch.bfloat16 if parameter.dtype != torch.bfloat16 else None
    if parameter.device.type == "cpu" and parameter.dtype == torch.float32 and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


@contextlib.contextmanager
def weights_in(model, dtype):
    """Hold every floating-point parameter of ``model`` (LoRA weights too) in ``dtype`` while the
    block runs, then put the original tensors back; buffers (the rotary frequencies) stay as they
    are. ``dtype`` None leaves the model alone."""
    chosen = [p for p in model.parameters() if p.is_floating_point() and p.dtype != dtype] if dtype is not None else []
    with _held_in(chosen, dtype) as count:
        yield count


@contextlib.contextmanager
def _held_in(params, dtype):
    """Store ``params`` in ``dtype`` while the block runs, then put their original tensors back."""
    originals = [(param, param.data) for param in params]
    for param, data in originals:
        param.data = data.to(dtype)
    try:
        yield len(originals)
    finally:
        for param, data in originals:
            param.data = data
