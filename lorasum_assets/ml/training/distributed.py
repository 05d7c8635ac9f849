"""Data-parallel training with accelerate: DDP over the processes that ``accelerate launch`` starts.

The accumulation window of ``gradient_accumulation_steps`` micro-batches is split across the
processes instead of multiplied by them, so a run on N processes takes the same optimizer steps
over the same examples as a run on one, and (with per-micro-batch dropout seeds) computes the same
gradients up to the order of floating-point sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lorasum_assets.ml.data.prompts import IGNORE_INDEX


def window_share(n_micro_batches: int, rank: int, world_size: int) -> list[int | None]:
    """The micro-batches of one accumulation window that ``rank`` runs, in order.

    Every rank makes the same number of backward passes (DDP all-reduces on each rank's last one);
    a rank with fewer real micro-batches fills up with ``None``, a pass whose loss is weighted 0.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    mine: list[int | None] = list(range(rank, n_micro_batches, world_size))
    passes = math.ceil(n_micro_batches / world_size)
    return mine + [None] * (passes - len(mine))


def micro_batch_seed(seed: int, step: int, micro_index: int) -> int:
    """The dropout seed of one micro-batch, the same whichever process runs it."""
    return (seed * 1_000_003 + step * 1_009 + micro_index) % (2**63 - 1)


def label_token_count(labels: Sequence[int]) -> int:
    """Label positions that count in the loss (the first token is never predicted)."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


def reduce_sum(accelerator, values: Sequence[float]) -> list[float]:
    """Sum floats over all processes (the values themselves when there is one)."""
    if accelerator is None or accelerator.num_processes == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=accelerator.device)
    return [float(v) for v in accelerator.reduce(tensor, reduction="sum")]
