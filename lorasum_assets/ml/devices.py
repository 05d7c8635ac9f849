"""What the hardware runs natively, asked once for training and for model loading alike."""

from __future__ import annotations

import torch


def cuda_has_native_bf16() -> bool:
    """bf16 in hardware (Ampere and newer). ``torch.cuda.is_bf16_supported()`` counts emulation by
    default, so a T4 or V100 would say yes and then run bf16 slowly; those get fp16 instead."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
