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

from lorasum_assets.ml.models.four_bit import restore_4bit_layout
from lorasum_assets.ml.models.loading import count_parameters
from lorasum_assets.ml.models.precision import frozen_weights_in, precision_name, training_autocast_dtype
from lorasum_assets.ml.training.batching import (
    TrainExample,
    collate_packed,
    collate_right,
    plan_batches,
    planned_steps,
    steps_per_epoch,
)
from lorasum_assets.ml.training.checkpoints import TrainState, complete_checkpoints, load_checkpoint, save_checkpoint
from lorasum_assets.ml.training.distributed import label_token_count, micro_batch_seed, reduce_sum, window_share
from lorasum_assets.ml.training.lora import training_attention, use_attention
from lorasum_assets.ml.training.loss import LabelLossModule, evaluate_loss
from lorasum_assets.ml.training.records import StepLog, TrainResult
from lorasum_assets.settings.specs import TrainSpec


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
    loop = _TrainingLoop(peft_model, list(train_examples), list(val_examples), spec, pad_id, checkpoint_dir, accelerator)
    return loop.run(on_step=on_step, on_epoch=on_epoch)


class _TrainingLoop:
    """The stages of one training, in the order ``run`` calls them: set up the optimizer, precision
    and loss; resume from a checkpoint; then per optimizer step, accumulate a window of
    micro-batches, step the optimizer, and log, validate and checkpoint."""

    def __init__(self, peft_model, train_examples, val_examples, spec: TrainSpec, pad_id: int, checkpoint_dir, accelerator):
        self.model, self.spec, self.pad_id = peft_model, spec, pad_id
        self.train_examples, self.val_examples = train_examples, val_examples
        self.checkpoint_dir, self.accelerator = checkpoint_dir, accelerator
        self.rank, self.world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
        self.lengths = [len(e.input_ids) for e in train_examples]
        self.result = TrainResult()
        self.step = 0
        self._checkpointed_step = 0  # the step of the newest checkpoint on disk
        self._busy = False
        self._setup()

    def _setup(self) -> None:
        spec, model = self.spec, self.model
        restore_4bit_layout(model)  # a model that generated or validated before it trains
        torch.manual_seed(spec.seed)
        self.result.trainable_params, self.result.total_params = count_parameters(model)
        self.per_epoch = steps_per_epoch(len(self.train_examples), spec)
        self.total_steps = self.result.total_steps = planned_steps(len(self.train_examples), spec)
        optimizer, scheduler, self.trainable = build_optimizer(model, spec, self.total_steps)
        self.autocast_dtype = training_autocast_dtype(model, spec.mixed_precision)
        self.result.precision = precision_name(self.autocast_dtype)
        device_type = next(model.parameters()).device.type
        # fp16 gradients overflow without loss scaling, on a GPU and on a CPU alike
        scaler = torch.amp.GradScaler(device_type) if self.autocast_dtype == torch.float16 else None
        self.state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        loss_module = LabelLossModule(model, self.autocast_dtype, spec.completion_only_logits)
        self.runner = self.accelerator.prepare_model(loss_module) if self.world > 1 else loss_module

    def _resume(self) -> None:
        if self.checkpoint_dir is None:
            return
        complete = complete_checkpoints(self.checkpoint_dir)
        if complete:
            self.step = load_checkpoint(complete[-1], self.state, self.result)
            self.result.resumed_from_step = self._checkpointed_step = self.step

    def run(self, on_step, on_epoch) -> TrainResult:
        self._resume()
        spec = self.spec
        started = time.perf_counter()
        self.model.train()
        with explain_out_of_memory(spec, max(self.lengths)), frozen_weights_in(self.model, self.autocast_dtype):
            try:
                self._loop(on_step, on_epoch)
            except BaseException:
                # Terminate in the UI interrupts the step: keep the steps made since the last checkpoint.
                self._checkpoint_on_the_way_out()
                raise
        self.model.eval()
        result = self.result
        result.grad_scale = self.state.scaler.get_scale() if self.state.scaler is not None else None
        result.real_tokens, result.padded_tokens = (int(v) for v in reduce_sum(self.accelerator, [result.real_tokens, result.padded_tokens]))
        result.seconds = time.perf_counter() - started
        return result

    def _checkpoint_on_the_way_out(self) -> None:
        """A checkpoint of the last whole optimizer step, when training stops early (Terminate, an
        error) after steps the last checkpoint does not hold. Not while an optimizer step is half
        applied, nor while a checkpoint was being written: then the last complete one stays."""
        if (self.checkpoint_dir is None or self.rank != 0 or self._busy or self.step <= self._checkpointed_step
                or self.step >= self.total_steps):
            return
        with contextlib.suppress(Exception):
            save_checkpoint(self.checkpoint_dir, self.step, self.state, self.result)

    def _loop(self, on_step, on_epoch) -> None:
        spec = self.spec
        while self.step < self.total_steps:
            epoch = self.step // self.per_epoch
            batches = plan_batches(self.lengths, spec.batch_size, spec.seed, epoch, spec.group_by_length)
            first_micro = (self.step % self.per_epoch) * spec.gradient_accumulation_steps
            for window_start in range(first_micro, len(batches), spec.gradient_accumulation_steps):
                window = batches[window_start : window_start + spec.gradient_accumulation_steps]
                step_started = time.perf_counter()
                window_loss, label_tokens = self._accumulate(window)
                self._busy = True  # the optimizer step and its log entry: no checkpoint of half of them
                grad_norm, learning_rate, skipped = self._optimizer_step()
                log = StepLog(
                    step=self.step, epoch=round(self.step / self.per_epoch, 4), loss=window_loss, learning_rate=learning_rate,
                    grad_norm=grad_norm, label_tokens=label_tokens, seconds=time.perf_counter() - step_started, skipped=skipped,
                )
                self.result.steps.append(log)
                self._busy = False
                if self._after_step(log, on_step, on_epoch):
                    break

    def _accumulate(self, window: list[list[int]]) -> tuple[float, int]:
        """Forward and backward over one accumulation window, this process's share of it; the
        window's loss (mean over its label tokens, summed over processes) and label tokens."""
        spec, world = self.spec, self.world
        label_tokens = sum(label_token_count(self.train_examples[i].labels) for b in window for i in b)
        window_loss = 0.0
        share = window_share(len(window), self.rank, world)
        for pass_index, micro_index in enumerate(share):
            real = micro_index is not None
            examples = [self.train_examples[i] for i in window[micro_index if real else 0]]
            batch = collate_packed(examples, self.pad_id) if spec.packing else collate_right(examples, self.pad_id)
            use_attention(self.model, training_attention(self.model, spec.attention, batch["input_ids"].shape[1]))
            if real:
                self.result.real_tokens += sum(len(e.input_ids) for e in examples)
                self.result.padded_tokens += batch["input_ids"].numel()
            torch.manual_seed(micro_batch_seed(spec.seed, self.step, micro_index if real else -1))
            last_pass = pass_index == len(share) - 1
            sync = self.runner.no_sync() if world > 1 and not last_pass else contextlib.nullcontext()
            with sync:
                loss_sum = self.runner(batch)
                # DDP averages gradients over processes; scaling by the world size makes that a sum.
                loss = loss_sum * (world / max(label_tokens, 1)) if real else loss_sum * 0.0
                if self.state.scaler is not None:
                    self.state.scaler.scale(loss).backward()
                else:
                    loss.backward()
            if real:
                window_loss += float(loss.detach()) / world
        (window_loss,) = reduce_sum(self.accelerator, [window_loss])
        return window_loss, label_tokens

    def _optimizer_step(self) -> tuple[float | None, float, bool]:
        """Clip, step and schedule; returns the gradient norm (None when not finite), the learning
        rate it stepped with, and whether the grad scaler skipped the update for overflowed
        gradients. A skipped step does not advance the learning-rate schedule."""
        if self.state.scaler is not None:
            self.state.scaler.unscale_(self.state.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, self.spec.max_grad_norm))
        learning_rate = self.state.scheduler.get_last_lr()[0]
        skipped = False
        if self.state.scaler is not None:
            scale = self.state.scaler.get_scale()
            self.state.scaler.step(self.state.optimizer)
            self.state.scaler.update()
            skipped = self.state.scaler.get_scale() < scale  # the scaler backs off exactly when it skipped
        else:
            self.state.optimizer.step()
        if not skipped:
            self.state.scheduler.step()
        self.state.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return (grad_norm if math.isfinite(grad_norm) and not skipped else None), learning_rate, skipped

    def _after_step(self, log: StepLog, on_step, on_epoch) -> bool:
        """Report the step, validate at the end of an epoch, checkpoint; True when the epoch is over."""
        spec, step, is_main = self.spec, self.step, self.rank == 0
        if is_main and on_step is not None and (step % spec.logging_steps == 0 or step == self.total_steps):
            on_step(log)
        epoch_done = step % self.per_epoch == 0 or step == self.total_steps
        if epoch_done:
            val_loss = evaluate_loss(self.model, self.val_examples, self.pad_id, mixed_precision=spec.mixed_precision, accelerator=self.accelerator)
            self.result.val_losses.append(val_loss)
            if is_main and on_epoch is not None:
                on_epoch(math.ceil(step / self.per_epoch), val_loss)
        if self.checkpoint_dir is not None and (step % spec.checkpoint_steps == 0 or epoch_done) and step < self.total_steps:
            if is_main:
                save_checkpoint(self.checkpoint_dir, step, self.state, self.result)
                self._checkpointed_step = step
            if self.world > 1:
                self.accelerator.wait_for_everyone()
        return step >= self.total_steps or epoch_done


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
