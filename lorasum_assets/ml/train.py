"""LoRA / QLoRA training: a small, explicit loop with dynamic padding, length grouping and resume.

Checkpoints hold the adapter weights, optimizer, scheduler and RNG state, so a killed run that is
started again with the same configuration continues from the last complete checkpoint and ends
with the same number of optimizer steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorasum_assets.ml.prompts import IGNORE_INDEX
from lorasum_assets.ml.specs import TrainSpec


@dataclass(frozen=True)
class TrainExample:
    input_ids: Sequence[int]
    labels: Sequence[int]


@dataclass(frozen=True)
class StepLog:
    step: int
    epoch: float
    loss: float
    learning_rate: float
    grad_norm: float
    label_tokens: int
    seconds: float


@dataclass
class TrainResult:
    steps: list[StepLog] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    total_steps: int = 0
    resumed_from_step: int = 0
    trainable_params: int = 0
    total_params: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0

    @property
    def final_train_loss(self) -> float | None:
        return self.steps[-1].loss if self.steps else None

    @property
    def final_val_loss(self) -> float | None:
        return self.val_losses[-1] if self.val_losses else None


def plan_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Deterministic batch order for one epoch.

    With length grouping, a shuffled pool is cut into mega-batches of 50 batches, each sorted by
    length, so batches hold similar lengths (little padding) while the order stays random.
    """
    order = list(range(len(lengths)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    if group_by_length and batch_size > 1:
        mega = batch_size * 50
        order = [i for start in range(0, len(order), mega) for i in sorted(order[start : start + mega], key=lambda i: -lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length and batch_size > 1:
        random.Random(seed * 1000 + epoch + 1).shuffle(batches)
    return batches


def collate_right(examples: Sequence[TrainExample], pad_id: int):
    """Right padding to the longest example in the batch; labels -100 on padding."""
    import torch

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
    import torch

    input_ids = torch.tensor([[t for e in examples for t in e.input_ids]], dtype=torch.long)
    labels = torch.tensor([[t for e in examples for t in e.labels]], dtype=torch.long)
    position_ids = torch.tensor([[i for e in examples for i in range(len(e.input_ids))]], dtype=torch.long)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_peft_model(model, spec: TrainSpec):
    """Wrap the base in LoRA. 4-bit bases go through ``prepare_model_for_kbit_training``."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpointing_kwargs = {"use_reentrant": False}
    attention = training_attention(model, spec.attention)
    if attention != model.config._attn_implementation:
        model.set_attn_implementation(attention)
    if is_quantized(model):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        model.enable_input_require_grads()
    if spec.gradient_checkpointing:
        model.config.use_cache = False
    config = LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(spec.target_modules),
        bias=spec.bias,
        task_type="CAUSAL_LM",
    )
    import torch

    torch.manual_seed(spec.seed)  # LoRA A matrices are randomly initialised: same seed, same start
    peft_model = get_peft_model(model, config)
    for _name, param in peft_model.named_parameters():
        if param.requires_grad and param.dtype != _float32():
            param.data = param.data.float()  # adapters stay fp32 (fp16 adapters break the grad scaler)
    if spec.compile_layers:
        compile_decoder_layers(peft_model)
    return peft_model


def training_attention(model, attention: str = "auto") -> str:
    """The attention kernel to train with.

    ``auto`` picks eager attention on CPU: SDPA trained at 0.82x (benchmarks/speed.py) and 0.85x
    (benchmarks/levers.py) of eager on SmolLM2-135M with bf16 autocast and batches of up to ~500
    tokens. On GPUs the model keeps its own choice (SDPA/flash kernels win there).
    """
    if attention in ("sdpa", "eager"):
        return attention
    if attention != "auto":
        raise ValueError(f"attention must be auto, sdpa or eager, got {attention!r}")
    device = next(model.parameters()).device
    return "eager" if device.type == "cpu" else model.config._attn_implementation


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


def _float32():
    import torch

    return torch.float32


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run about twice as fast as fp32 on this CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _autocast_dtype(model, mixed_precision: str = "auto"):
    """The autocast dtype for training; adapters themselves stay fp32.

    ``auto``: bf16 on GPUs that have it, fp16 on older GPUs, bf16 on CPUs with native bf16
    (measured: 2.3x faster per step on SmolLM2-135M, loss within 0.02% of fp32), else fp32.
    """
    import torch

    device = next(model.parameters()).device
    if mixed_precision == "no":
        return None
    if mixed_precision in ("bf16", "fp16"):
        return torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    if mixed_precision != "auto":
        raise ValueError(f"mixed_precision must be auto, bf16, fp16 or no, got {mixed_precision!r}")
    if device.type != "cuda":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def frozen_weights_in(model, dtype):
    """Store the frozen fp32 base weights in ``dtype`` while the block runs, then put the originals back.

    Under autocast every forward would cast them to ``dtype`` again; casting once gives the same
    rounded values without the per-step cost (SmolLM2-135M, CPU bf16: keeping them fp32 trains at
    0.91x; benchmarks/speed.py). Buffers (rotary frequencies) are left alone, and the model leaves
    the block with its own fp32 weights, so only the LoRA weights have changed.
    """
    import torch

    originals = []
    if dtype in (torch.bfloat16, torch.float16) and not is_quantized(model):
        for param in model.parameters():
            if not param.requires_grad and param.dtype == torch.float32:
                originals.append((param, param.data))
                param.data = param.data.to(dtype)
    try:
        yield len(originals)
    finally:
        for param, data in originals:
            param.data = data


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
    import torch
    import torch.nn.functional as F

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
    import torch

    from lorasum_assets.ml.distributed import reduce_sum

    if not examples:
        return None
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))[rank::world]
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = collate_right([examples[i] for i in order[start : start + batch_size]], pad_id)
            loss, n = token_loss_sum(model, batch, _autocast_dtype(model, mixed_precision))
            total += float(loss)
            count += n
    model.train(was_training)
    total, count = reduce_sum(accelerator, [total, count])
    return total / max(count, 1)


def _complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    if not checkpoint_dir.exists():
        return []
    found = [p for p in checkpoint_dir.glob("step-*") if (p / "COMPLETE").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(checkpoint_dir: Path, step: int, peft_model, optimizer, scheduler, scaler, result: TrainResult) -> None:
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".step-", dir=checkpoint_dir))
    adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(adapter, str(staging / "adapter.safetensors"))
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, staging / "trainer_state.pt")
    meta = {"step": step, "val_losses": result.val_losses, "steps": [asdict(s) for s in result.steps]}
    (staging / "progress.json").write_text(json.dumps(meta))
    (staging / "COMPLETE").write_text("ok")
    final = checkpoint_dir / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
    for old in _complete_checkpoints(checkpoint_dir)[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, peft_model, optimizer, scheduler, scaler, result: TrainResult) -> int:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(path / "adapter.safetensors")))
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    meta = json.loads((path / "progress.json").read_text())
    result.val_losses = list(meta["val_losses"])
    result.steps = [StepLog(**s) for s in meta["steps"]]
    return int(meta["step"])


def steps_per_epoch(n_examples: int, spec: TrainSpec) -> int:
    return math.ceil(math.ceil(n_examples / spec.batch_size) / spec.gradient_accumulation_steps)


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
    import torch
    from transformers import get_scheduler

    from lorasum_assets.ml.distributed import LabelLossModule, label_token_count, micro_batch_seed, reduce_sum, window_share
    from lorasum_assets.ml.modeling import count_parameters

    if not train_examples:
        raise ValueError("no training examples")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    is_main = rank == 0

    torch.manual_seed(spec.seed)
    result = TrainResult()
    result.trainable_params, result.total_params = count_parameters(peft_model)
    per_epoch = steps_per_epoch(len(train_examples), spec)
    total_steps = per_epoch * spec.epochs
    if spec.max_steps is not None:
        total_steps = min(total_steps, spec.max_steps)
    result.total_steps = total_steps
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
    autocast_dtype = _autocast_dtype(peft_model, spec.mixed_precision)
    on_cuda = next(peft_model.parameters()).device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 and on_cuda else None
    loss_module = LabelLossModule(peft_model, autocast_dtype, spec.completion_only_logits)
    runner = accelerator.prepare_model(loss_module) if world > 1 else loss_module

    step = 0
    if checkpoint_dir is not None:
        complete = _complete_checkpoints(checkpoint_dir)
        if complete:
            step = _load_checkpoint(complete[-1], peft_model, optimizer, scheduler, scaler, result)
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
                        _save_checkpoint(checkpoint_dir, step, peft_model, optimizer, scheduler, scaler, result)
                    if world > 1:
                        accelerator.wait_for_everyone()
                if step >= total_steps or epoch_done:
                    break
    peft_model.eval()
    result.real_tokens, result.padded_tokens = (int(v) for v in reduce_sum(accelerator, [result.real_tokens, result.padded_tokens]))
    result.seconds = time.perf_counter() - started
    return result


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def lora_b_all_zero(adapter_file: Path) -> bool:
    """True when every LoRA B matrix in a saved adapter is still zero: the adapter changes nothing."""
    from safetensors import safe_open

    with safe_open(str(adapter_file), framework="pt") as weights:
        b_keys = [k for k in weights.keys() if "lora_B" in k]
        return bool(b_keys) and all(not weights.get_tensor(k).any() for k in b_keys)


class AdapterWriteError(OSError):
    """The adapter folder could not be written; nothing was left that looks like an adapter."""


def save_adapter(peft_model, tokenizer, target: Path) -> Path:
    """Write the adapter folder (the notebook's ``training-output/`` layout) atomically.

    Everything goes to a hidden staging folder first and is renamed into place, so a crash never
    leaves a folder that looks complete.
    """
    target = Path(target)
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        peft_model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        missing = [name for name in ADAPTER_FILES if not (staging / name).exists()]
        if missing:
            raise AdapterWriteError(f"adapter save did not write {missing}")
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    except OSError as exc:
        if isinstance(exc, AdapterWriteError):
            raise
        raise AdapterWriteError(f"cannot write the adapter to {target}: {exc.strerror or exc}") from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def explain_out_of_memory(spec: TrainSpec, max_length: int | None = None):
    """Turn a CUDA OOM into an error that says which knobs to turn."""
    import torch

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
