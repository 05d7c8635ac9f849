"""Data and batching: length-grouped micro-batches, right padding, packing."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorasum_assets.ml.data.prompts import IGNORE_INDEX
from lorasum_assets.settings.specs import TrainSpec


@dataclass(frozen=True)
class TrainExample:
    input_ids: Sequence[int]
    labels: Sequence[int]


def batches_per_mega_batch(n_examples: int, batch_size: int) -> int:
    """50 batches, as HF's length-grouped sampler, but at least two mega-batches per epoch: with
    one, every epoch sorts the whole set the same way and gets the same batches, only reordered."""
    return max(1, min(50, n_examples // (2 * batch_size)))


def plan_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Deterministic batch order for one epoch.

    With length grouping, the epoch's shuffled examples are cut into mega-batches, each sorted by
    length and cut into batches, so batches hold similar lengths (little padding) while each
    epoch's batches and their order differ. Each epoch draws its two shuffles from seeds of its own.
    """
    order = list(range(len(lengths)))
    random.Random(f"{seed}:{epoch}:examples").shuffle(order)
    if group_by_length and batch_size > 1:
        mega = batch_size * batches_per_mega_batch(len(order), batch_size)
        order = [i for start in range(0, len(order), mega) for i in sorted(order[start : start + mega], key=lambda i: -lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length and batch_size > 1:
        random.Random(f"{seed}:{epoch}:batches").shuffle(batches)
    return batches


def collate_right(examples: Sequence[TrainExample], pad_id: int):
    """Right padding to the longest example in the batch; labels -100 on padding."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(list(example.input_ids))
        labels[row, :n] = torch.tensor(list(example.labels))
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(examples: Sequence[TrainExample], pad_id: int):
    """The batch's examples end to end in one row, with no padding at all.

    Position ids restart at 0 for every example and no attention mask is passed, so transformers
    builds a block-diagonal causal mask: no token attends across an example boundary. Every
    example starts with prompt tokens labelled -100, so no label is predicted across one either.
    """
    input_ids = torch.tensor([[t for e in examples for t in e.input_ids]], dtype=torch.long)
    labels = torch.tensor([[t for e in examples for t in e.labels]], dtype=torch.long)
    position_ids = torch.tensor([[i for e in examples for i in range(len(e.input_ids))]], dtype=torch.long)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def planned_steps(n_examples: int, spec: TrainSpec) -> int:
    """Optimizer steps a run takes: every epoch's, capped by max_steps."""
    total = steps_per_epoch(n_examples, spec) * spec.epochs
    return min(total, spec.max_steps) if spec.max_steps is not None else total


def steps_per_epoch(n_examples: int, spec: TrainSpec) -> int:
    return math.ceil(math.ceil(n_examples / spec.batch_size) / spec.gradient_accumulation_steps)
