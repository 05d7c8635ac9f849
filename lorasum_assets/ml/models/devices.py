"""What the hardware runs natively, asked once for training and for model loading alike."""

from __future__ import annotations

import functools
import gc

import torch


def cuda_has_native_bf16() -> bool:
    """bf16 in hardware (Ampere and newer). ``torch.cuda.is_bf16_supported()`` counts emulation by
    default, so a T4 or V100 would say yes and then run bf16 slowly; those get fp16 instead."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def free_accelerator_memory() -> None:
    """Give back what dropped models held: collect their reference cycles, then empty CUDA's cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def take_peak_gpu_memory() -> dict:
    """``{"peak_gpu_memory_gib": …}``: the most CUDA memory this process allocated since the last
    take (``torch.cuda.max_memory_allocated``), and a new count from now; empty where CUDA was not
    used. A step that takes it once, at its end, records its own peak."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return {"peak_gpu_memory_gib": round(peak / 2**30, 3)}


# CPU features that decide what runs fast here (bf16 matmuls, AMX tiles)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@functools.cache
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and its feature flags, read once from /proc/cpuinfo."""
    model, flags = "unknown CPU", frozenset()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags":
                flags = frozenset(value.split())
                break
    except OSError:
        pass
    return model, flags


def describe_device(device) -> str:
    """The device as a run records it: the GPU's name, or the CPU's model and its bf16/AMX flags."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model, flags = cpu_model_and_flags()
    present = [flag for flag in CPU_FLAGS if flag in flags]
    return f"{device.type}: {model} ({' '.join(present) or 'none of ' + '/'.join(CPU_FLAGS)})"
