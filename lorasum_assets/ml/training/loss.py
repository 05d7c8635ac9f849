"""The loss: summed token cross-entropy on the label positions, and the validation loss."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lorasum_assets.ml.data.prompts import IGNORE_INDEX
from lorasum_assets.ml.models.four_bit import evaluating
from lorasum_assets.ml.models.precision import training_autocast_dtype
from lorasum_assets.ml.training.batching import TrainExample, collate_right
from lorasum_assets.ml.training.distributed import reduce_sum


def _lm_parts(model):
    """(decoder, lm_head) when the LM head can be applied to chosen positions only, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    try:
        decoder, lm_head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or lm_head is None:
        return None
    return decoder, lm_head


def token_loss_sum(model, batch, autocast_dtype=None, completion_only_logits: bool = True):
    """Summed token cross-entropy over the label positions, and the number of them.

    With ``completion_only_logits`` the LM head runs only where there is a label (the summary),
    not over the prompt: the same loss with a fraction of the logits memory.
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch.pop("labels")
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    parts = _lm_parts(model) if completion_only_logits else None
    context = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with context:
        if parts is not None:
            decoder, lm_head = parts
            hidden = decoder(**batch, use_cache=False).last_hidden_state[:, :-1, :]
            logits = lm_head(hidden[keep])
            targets = shift_labels[keep]
        else:
            logits = model(**batch, use_cache=False).logits[:, :-1, :][keep]
            targets = shift_labels[keep]
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, int(keep.sum())


def evaluate_loss(
    model,
    examples: Sequence[TrainExample],
    pad_id: int,
    batch_size: int = 8,
    mixed_precision: str = "auto",
    accelerator=None,
) -> float | None:
    """Mean token loss over ``examples``; with several processes each scores a share and the sums are reduced."""
    if not examples:
        return None
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))[rank::world]
    with evaluating(model), torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = collate_right([examples[i] for i in order[start : start + batch_size]], pad_id)
            loss, n = token_loss_sum(model, batch, training_autocast_dtype(model, mixed_precision))
            total += float(loss)
            count += n
    total, count = reduce_sum(accelerator, [total, count])
    return total / max(count, 1)


class LabelLossModule(torch.nn.Module):
    """The model plus its summed label cross-entropy, as one module that DDP can wrap.

    DDP only synchronises gradients for work done through its own ``forward``; the completion-only
    loss calls the decoder and the LM head separately, so both live behind this forward.
    """

    def __init__(self, model, autocast_dtype=None, completion_only_logits: bool = True) -> None:
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.completion_only_logits = completion_only_logits

    def forward(self, batch: dict) -> torch.Tensor:
        loss_sum, _ = token_loss_sum(self.model, batch, self.autocast_dtype, self.completion_only_logits)
        return loss_sum
