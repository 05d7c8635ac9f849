"""LoRA / QLoRA training: the loop, in named stages.

- model setup: ``model_setup.py`` (LoRA wrapping, k-bit preparation, attention kernel)
- optimizer and scheduler: ``build_optimizer`` here
- data and batching: ``batching.py`` (length grouping, padding, packing)
- precision: ``precision.py`` (autocast dtype, frozen weights stored once in it)
- the loss: ``loss.py``; checkpointing: ``checkpoints.py``; the adapter folder: ``adapter_files.py``

Checkpoints hold the adapter weights, optimizer, scheduler and RNG state, so a killed run that is
started again with the same configuration continues from the last complete checkpoint and ends
with the same number of optimizer steps.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import get_scheduler

from lorasum_assets.ml.batching import TrainExample, collate_packed, collate_right, plan_batches, planned_steps, steps_per_epoch
from lorasum_assets.ml.checkpoints import complete_checkpoints, load_checkpoint, save_checkpoint
from lorasum_assets.ml.distributed import label_token_count, micro_batch_seed, reduce_sum, window_share
from lorasum_assets.ml.loss import LabelLossModule, evaluate_loss
from lorasum_assets.ml.model_setup import training_attention, use_attention
from lorasum_assets.ml.modeling import count_parameters
from lorasum_assets.ml.precision import frozen_weights_in, training_autocast_dtype
from lorasum_assets.ml.progress import StepLog, TrainResult
from lorasum_assets.ml.specs import TrainSpec


def build_optimizer(peft_model, spec: TrainSpec, total_steps: int):
    """AdamW over the trainable (LoRA) weights, weight decay on matrices only, and the schedule.
    Returns (optimizer, scheduler, trainable parameters)."""
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.learning_rate,
    )
    scheduler = get_scheduler(
        spec.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(spec.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return optimizer, scheduler, trainable


def train_lora(
    peft_model,
    train_examples: Sequence[TrainExample],
    val_examples: Sequence[TrainExample],
    spec: TrainSpec,
    pad_id: int,
    checkpoint_dir: Path | None = None,
    on_step: Callable[[StepLog], None] | None = None,
    on_epoch: Callable[[int, float | None], None] | None = None,
    accelerator=None,
) -> TrainResult:
    """Train the LoRA weights of ``peft_model`` in place.

    With an ``accelerate.Accelerator`` of several processes (``accelerate launch``), the model is
    wrapped in DDP and each accumulation window's micro-batches are shared out between the
    processes: same optimizer steps, same examples per step, gradients summed across processes.
    Only the main process calls ``on_step``/``on_epoch`` and writes checkpoints.
    """
    if not train_examples:
        raise ValueError("no training examples")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    is_main = rank == 0

    torch.manual_seed(spec.seed)
    result = TrainResult()
    result.trainable_params, result.total_params = count_parameters(peft_model)
    per_epoch = steps_per_epoch(len(train_examples), spec)
    total_steps = planned_steps(len(train_examples), spec)
    result.total_steps = total_steps
    optimizer, scheduler, trainable = build_optimizer(peft_model, spec, total_steps)
    autocast_dtype = training_autocast_dtype(peft_model, spec.mixed_precision)
    on_cuda = next(peft_model.parameters()).device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 and on_cuda else None
    loss_module = LabelLossModule(peft_model, autocast_dtype, spec.completion_only_logits)
    runner = accelerator.prepare_model(loss_module) if world > 1 else loss_module

    step = 0
    if checkpoint_dir is not None:
        complete = complete_checkpoints(checkpoint_dir)
        if complete:
            step = load_checkpoint(complete[-1], peft_model, optimizer, scheduler, scaler, result)
            result.resumed_from_step = step

    lengths = [len(e.input_ids) for e in train_examples]
    started = time.perf_counter()
    peft_model.train()
    with explain_out_of_memory(spec, max(lengths)), frozen_weights_in(peft_model, autocast_dtype):
        while step < total_steps:
            epoch = step // per_epoch
            batches = plan_batches(lengths, spec.batch_size, spec.seed, epoch, spec.group_by_length)
            first_micro = (step % per_epoch) * spec.gradient_accumulation_steps
            for window_start in range(first_micro, len(batches), spec.gradient_accumulation_steps):
                window = batches[window_start : window_start + spec.gradient_accumulation_steps]
                label_tokens = sum(label_token_count(train_examples[i].labels) for b in window for i in b)
                step_started = time.perf_counter()
                window_loss = 0.0
                share = window_share(len(window), rank, world)
                for pass_index, micro_index in enumerate(share):
                    real = micro_index is not None
                    examples = [train_examples[i] for i in window[micro_index if real else 0]]
                    batch = collate_packed(examples, pad_id) if spec.packing else collate_right(examples, pad_id)
                    use_attention(peft_model, training_attention(peft_model, spec.attention, batch["input_ids"].shape[1]))
                    if real:
                        result.real_tokens += sum(len(e.input_ids) for e in examples)
                        result.padded_tokens += batch["input_ids"].numel()
                    torch.manual_seed(micro_batch_seed(spec.seed, step, micro_index if real else -1))
                    last_pass = pass_index == len(share) - 1
                    sync = runner.no_sync() if world > 1 and not last_pass else contextlib.nullcontext()
                    with sync:
                        loss_sum = runner(batch)
                        # DDP averages gradients over processes; scaling by the world size makes that a sum.
                        loss = loss_sum * (world / max(label_tokens, 1)) if real else loss_sum * 0.0
                        if scaler is not None:
                            scaler.scale(loss).backward()
                        else:
                            loss.backward()
                    if real:
                        window_loss += float(loss.detach()) / world
                (window_loss,) = reduce_sum(accelerator, [window_loss])
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, spec.max_grad_norm))
                learning_rate = scheduler.get_last_lr()[0]
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                log = StepLog(
                    step=step,
                    epoch=round(step / per_epoch, 4),
                    loss=window_loss,
                    learning_rate=learning_rate,
                    grad_norm=grad_norm,
                    label_tokens=label_tokens,
                    seconds=time.perf_counter() - step_started,
                )
                result.steps.append(log)
                if is_main and on_step is not None and (step % spec.logging_steps == 0 or step == total_steps):
                    on_step(log)
                epoch_done = step % per_epoch == 0 or step == total_steps
                if epoch_done:
                    val_loss = evaluate_loss(
                        peft_model, val_examples, pad_id, mixed_precision=spec.mixed_precision, accelerator=accelerator
                    )
                    result.val_losses.append(val_loss)
                    if is_main and on_epoch is not None:
                        on_epoch(math.ceil(step / per_epoch), val_loss)
                if checkpoint_dir is not None and (step % spec.checkpoint_steps == 0 or epoch_done) and step < total_steps:
                    if is_main:
                        save_checkpoint(checkpoint_dir, step, peft_model, optimizer, scheduler, scaler, result)
                    if world > 1:
                        accelerator.wait_for_everyone()
                if step >= total_steps or epoch_done:
                    break
    peft_model.eval()
    result.real_tokens, result.padded_tokens = (int(v) for v in reduce_sum(accelerator, [result.real_tokens, result.padded_tokens]))
    result.seconds = time.perf_counter() - started
    return result


@contextlib.contextmanager
def explain_out_of_memory(spec: TrainSpec, max_length: int | None = None):
    """Turn a CUDA OOM into an error that says which knobs to turn."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        raise RuntimeError(out_of_memory_advice(spec, max_length)) from exc


def out_of_memory_advice(spec: TrainSpec, max_length: int | None = None) -> str:
    length = f", or max_length (now {max_length})" if max_length else ", or max_length"
    return (
        f"CUDA ran out of memory while training: lower batch_size (now {spec.batch_size}) and raise "
        f"gradient_accumulation_steps (now {spec.gradient_accumulation_steps}) to keep the effective batch{length}; "
        "gradient_checkpointing=true and quantization=nf4 also save memory"
    )
