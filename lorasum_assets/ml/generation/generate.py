"""Batched, left-padded greedy generation that decodes only the new tokens."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import transformers
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from lorasum_assets.ml.generation import decoding
from lorasum_assets.ml.models.devices import describe_device, free_accelerator_memory
from lorasum_assets.ml.models.precision import generation_dtype, weights_in
from lorasum_assets.ml.progress import DecodingHeartbeat
from lorasum_assets.settings.specs import GenerationSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    hit_limit: bool
    latency_s: float


@dataclass(frozen=True)
class EngineRecord:
    """What generated, as it ran: the engine (``lorasum``: the decoder of ``ml/generation/decoding.py``;
    ``transformers``: ``model.generate``), the dtype the weights were held in, the device, and the
    library versions."""

    engine: str
    dtype: str
    device: str
    torch: str
    transformers: str

    def as_dict(self) -> dict:
        return asdict(self)

    def short(self) -> str:
        return f"{self.engine} {self.dtype}"


class Generations(list):
    """The generations in prompt order, and ``engine``: the ``EngineRecord`` of what made them."""

    engine: EngineRecord


def engine_record(model, engine: str, dtype) -> EngineRecord:
    held = str(held_dtype(model, dtype)).replace("torch.", "")
    return EngineRecord(engine, held, describe_device(next(model.parameters()).device), torch.__version__, transformers.__version__)


def has_active_adapter(model) -> bool:
    """True when LoRA layers are injected and enabled in ``model``."""

    return any(isinstance(m, BaseTunerLayer) and not m.disable_adapters for m in model.modules())


def plan_generation_batches(lengths: Sequence[int], batch_size: int, max_padding_share: float | None) -> list[list[int]]:
    """Indices sorted by prompt length, cut into batches of at most ``batch_size`` whose padding
    stays within ``max_padding_share`` of their real tokens (None: no padding limit)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        candidate = current + [index]
        width = lengths[index]  # ascending order: the newest prompt is the longest
        real = sum(lengths[i] for i in candidate)
        too_padded = max_padding_share is not None and width * len(candidate) > (1 + max_padding_share) * real
        if current and (len(candidate) > batch_size or too_padded):
            batches.append(current)
            candidate = [index]
        current = candidate
    if current:
        batches.append(current)
    return batches


def padding_limit(model, spec: GenerationSpec) -> float | None:
    """``spec.max_padding_share`` on a CPU, where the prefill is compute-bound and padding costs
    its share of time; None (full batches) on a GPU, where a wider batch costs little more."""
    return spec.max_padding_share if next(model.parameters()).device.type == "cpu" else None


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a summary: the model's generation config may list several (Llama 3
    Instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>), plus the tokenizer's EOS."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates = configured if isinstance(configured, list | tuple) else [configured]
    ids: list[int] = []
    for token_id in [*candidates, tokenizer.eos_token_id]:
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    return ids


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """The tokens before the first stop id, and whether a stop id was found."""
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return list(tokens[:position]), True
    return list(tokens), False


def collate_left(prompts: Sequence[Sequence[int]], pad_id: int):
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    spec: GenerationSpec,
    on_batch: Callable[[int, int], None] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Generations:
    """Summaries for ``prompts`` (token ids), in the order given, with the record of the engine
    that made them (``.engine``). ``on_batch(done, total)`` follows
    each batch; ``on_progress`` gets a line every ~10 s while a batch decodes.

    Prompts are sorted by length and batched. ``model.generate`` gets left-padded batches that
    close early rather than pad more than ``max_padding_share``; the lorasum decoder
    (``spec.decoder``, ``ml/generation/decoding.py``) prefills unpadded and takes full batches. Latency is the
    batch's wall time shared equally among its rows.
    """

    dtype = generation_dtype(model, spec.precision)
    engine = chosen_decoder(model, spec, dtype)
    generations = Generations(_generate_with(engine, dtype, model, tokenizer, prompts, spec, on_batch, on_progress) if prompts else [])
    generations.engine = engine_record(model, engine, dtype)
    return generations


def _generate_with(engine: str, dtype, model, tokenizer, prompts, spec: GenerationSpec, on_batch, on_progress) -> list[Generation]:
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    if engine == "lorasum":
        prepared = decoding.prepare(model, held_dtype(model, dtype))  # its own copy of the weights: the model stays as it is

        def decode_batch(batch, heartbeat):
            if heartbeat is not None:
                heartbeat.put(None)  # the prompt, as generate's streamer gets it first
            on_step = functools.partial(heartbeat.put, None) if heartbeat is not None else None
            return decoding.greedy_decode(prepared, batch, max_new_tokens=spec.max_new_tokens, stop_ids=stop_ids, on_step=on_step)

        # The prefill runs unpadded, so only the decoding attention sees padding: no padding limit.
        batches = plan_generation_batches([len(p) for p in prompts], spec.batch_size, None)
        return _run_batches(tokenizer, prompts, spec, batches, stop_ids, decode_batch, on_batch, on_progress)

    generation_kwargs = {
        "max_new_tokens": spec.max_new_tokens,
        "do_sample": spec.do_sample,
        "eos_token_id": stop_ids,
        "pad_token_id": pad_id,
    }
    if spec.do_sample:
        generation_kwargs.update(temperature=spec.temperature, top_p=spec.top_p)
        torch.manual_seed(spec.seed)
    else:
        generation_kwargs.update(temperature=None, top_p=None, top_k=None)
    batches = plan_generation_batches([len(p) for p in prompts], spec.batch_size, padding_limit(model, spec))
    with weights_in(model, dtype):
        return _run_batches(tokenizer, prompts, spec, batches, stop_ids,
                            functools.partial(_generate_batch, model, spec, generation_kwargs), on_batch, on_progress)


def held_dtype(model, dtype):
    """The dtype ``model``'s weights are held in while generating: ``dtype``, or None for as loaded."""
    return dtype if dtype is not None else next(model.parameters()).dtype


def chosen_decoder(model, spec: GenerationSpec, dtype) -> str:
    """``lorasum`` or ``transformers``, as ``spec.decoder`` asks, for ``model`` held in ``dtype``
    (None: as loaded). ``auto`` takes lorasum for greedy decoding of a model it supports held in
    bf16; ``lorasum`` asked for where it cannot run is an error."""
    reason = "it decodes greedily only" if spec.do_sample else decoding.unsupported_reason(model)
    if spec.decoder == "lorasum" and reason is not None:
        raise ValueError(f"GenerationSpec.decoder = 'lorasum' cannot generate here: {reason}; use 'transformers' or 'auto'")
    if spec.decoder == "auto":
        return "lorasum" if reason is None and held_dtype(model, dtype) == torch.bfloat16 else "transformers"
    return spec.decoder


def _generate_batch(model, spec: GenerationSpec, generation_kwargs: dict, batch, heartbeat) -> list[list[int]]:
    """The new tokens of every prompt in ``batch``, one left-padded ``model.generate`` call."""
    input_ids, attention_mask = collate_left(batch, generation_kwargs["pad_token_id"])
    device = next(model.parameters()).device
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), streamer=heartbeat, **generation_kwargs
        )
    return output[:, input_ids.shape[1] :].cpu().tolist()


def _run_batches(tokenizer, prompts, spec, batches, stop_ids, decode_batch, on_batch, on_progress) -> list[Generation]:
    """``decode_batch(prompts, heartbeat)`` on every batch, its rows cut at their first stop id.
    A batch that runs the GPU out of memory is split in half, and later batches are no larger,
    down to one prompt at a time; only a single prompt that does not fit fails."""
    results: list[Generation | None] = [None] * len(prompts)
    done, limit = 0, spec.batch_size
    pending = [(number, list(indices)) for number, indices in enumerate(batches, start=1)]
    while pending:
        batch_number, indices = pending.pop(0)
        if len(indices) > limit:
            pending[:0] = [(batch_number, indices[:limit]), (batch_number, indices[limit:])]
            continue
        heartbeat = (
            DecodingHeartbeat(on_progress, f"batch {batch_number}/{len(batches)}", spec.max_new_tokens) if on_progress else None
        )
        started = time.perf_counter()
        try:
            rows = decode_batch([prompts[i] for i in indices], heartbeat)
        except torch.cuda.OutOfMemoryError as exc:
            if len(indices) == 1:
                raise RuntimeError(
                    f"CUDA ran out of memory while generating for a single prompt: lower the generation batch_size "
                    f"(now {spec.batch_size}) or max_new_tokens (now {spec.max_new_tokens}), or set max_prompt_tokens "
                    f"(this prompt: {len(prompts[indices[0]])} tokens)"
                ) from exc
            rows = None
        if rows is None:
            # outside the handler: its traceback held the failed batch's tensors (KV cache, logits)
            free_accelerator_memory()
            limit = (len(indices) + 1) // 2
            message = f"CUDA ran out of memory generating {len(indices)} summaries at once; going on {limit} at a time"
            logger.warning(message)
            if on_progress is not None:
                on_progress(message)
            pending.insert(0, (batch_number, indices))
            continue
        elapsed = time.perf_counter() - started
        for index, row in zip(indices, rows):
            tokens, stopped = cut_at_stop(row, stop_ids)
            # Rows that finished early are padded after their stop id, which the cut removes.
            hit_limit = not stopped and len(tokens) >= spec.max_new_tokens
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results[index] = Generation(text, len(tokens), hit_limit, elapsed / len(indices))
        done += len(indices)
        if on_batch is not None:
            on_batch(done, len(prompts))
    return [r for r in results if r is not None]


def generate_with_adapter(
    base_model,
    adapter_path: str,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    spec: GenerationSpec,
    on_batch: Callable[[int, int], None] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> list[Generation]:
    """Generate with ``adapter_path`` applied to ``base_model``, and leave the base as it was.

    ``PeftModel.from_pretrained`` injects LoRA layers into the base in place (the notebook's base
    column was contaminated this way); ``unload()`` takes them out again without merging.
    """

    tuned = PeftModel.from_pretrained(base_model, adapter_path, is_trainable=False)
    try:
        tuned.eval()
        return generate(tuned, tokenizer, prompts, spec, on_batch, on_progress)
    finally:
        restored = tuned.unload()
        if has_active_adapter(restored):
            raise RuntimeError("unloading the adapter left LoRA layers in the base model")


def prompt_budget(spec: GenerationSpec, base) -> int:
    """Tokens a prompt may have: the setting, else the model's context minus max_new_tokens, so
    no dialogue, however long, can run the machine out of memory."""
    if spec.max_prompt_tokens is not None:
        return spec.max_prompt_tokens
    context = getattr(base.config, "max_position_embeddings", None) or 2048
    if context - spec.max_new_tokens < 16:
        raise ValueError(f"GenerationSpec.max_new_tokens = {spec.max_new_tokens} leaves no room for a prompt in the model's {context}-token context")
    return context - spec.max_new_tokens
