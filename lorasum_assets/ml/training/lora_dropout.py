"""LoRA dropout with a cheaper mask on CPU.

PEFT runs ``torch.nn.Dropout`` on the input of every LoRA layer. On CPU, drawing its mask costs more
than the rest of the dropout: torch draws one random float per element. Here each element gets 15
random bits instead (four elements per 64-bit random word) and is kept when they are at or above
``round(p * 2**15)``, so the drop probability is that threshold over 2**15 (within 2e-5 of ``p``);
the kept elements are scaled by the inverse of the keep probability actually used, so the output's
expectation is the input, as with torch's dropout. Only the random stream differs.

The masks come from torch's global generator on the input's device, so ``torch.manual_seed`` makes
them reproducible and gradient checkpointing (which restores that generator's state before
recomputing a layer) recomputes the same masks.
"""

from __future__ import annotations

import math

import torch

from lorasum_assets.settings.specs import LORA_DROPOUT_MASKS

MASK_BITS = 15
_MASK_VALUES = 1 << MASK_BITS


def drop_threshold(p: float) -> int:
    """Elements whose 15-bit draw is below this are dropped."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return round(p * _MASK_VALUES)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A boolean mask of ``shape``, each element kept with probability ``1 - drop_threshold(p) / 2**15``."""
    return _keep_mask(shape, drop_threshold(p), device)


def _keep_mask(shape: torch.Size | tuple[int, ...], threshold: int, device: torch.device | str) -> torch.Tensor:
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_()
    # random_() on int64 draws from [0, 2**63): the top bit of each word is always 0, so every
    # 16-bit lane is cut to its low 15 bits, which are uniform in all four lanes.
    draws = words.view(torch.int16)[:count] & (_MASK_VALUES - 1)
    return (draws >= threshold).view(shape)


class PackedBitsDropout(torch.nn.Module):
    """Dropout with probability ``p`` whose mask is drawn from 15 random bits per element."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = drop_threshold(p)
        self.scale = _MASK_VALUES / (_MASK_VALUES - self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        # The scaled mask is kept as fp32 for the backward pass (4 bytes per element where torch's dropout
        # keeps 1): a boolean mask would need converting again in the backward pass, which measured
        # slower (python -m benchmarks.dropout cost). With gradient checkpointing only
        # the layer being recomputed holds its masks.
        mask = _keep_mask(x.shape, self.threshold, x.device).to(torch.float32).mul_(self.scale)
        return (x * mask).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}, drop={self.threshold}/{_MASK_VALUES}"


def lora_dropout_mask_for(model, choice: str = "auto") -> str:
    """``packed_bits`` or ``torch``. ``auto``: packed bits on CPU (faster there than torch's dropout:
    ``python -m benchmarks.dropout cost``, figures in docs/performance.md), torch's own fused dropout
    on GPUs."""
    if choice not in LORA_DROPOUT_MASKS:
        raise ValueError(f"lora_dropout_mask must be one of {', '.join(LORA_DROPOUT_MASKS)}, got {choice!r}")
    if choice != "auto":
        return choice
    device = next(model.parameters()).device
    return "packed_bits" if device.type == "cpu" else "torch"


def use_packed_bits_dropout(peft_model) -> int:
    """Replace every LoRA layer's ``torch.nn.Dropout`` with a ``PackedBitsDropout`` of the same ``p``.

    Dropout has no weights, so the adapter's files and config are unchanged. Returns how many were
    replaced (none when ``lora_dropout`` is 0: PEFT puts an identity there).
    """
    replaced = 0
    for module in peft_model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for adapter_name, dropout in dropouts.items():
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                packed = PackedBitsDropout(dropout.p)
                packed.train(dropout.training)
                dropouts[adapter_name] = packed
                replaced += 1
    return replaced
