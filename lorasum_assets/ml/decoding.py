"""Greedy decoding of a Llama-architecture model on CPU, without ``model.generate``.

Three things make it faster than ``generate`` on one left-padded batch (figures in
docs/performance.md):

- **Prefill without padding.** Each prompt is prefilled on its own, at its own length, so no
  matmul or attention runs on padding; the batch is formed only for decoding.
- **A preallocated KV cache.** Keys and values are written into one buffer per layer, sized for
  the longest prompt plus ``max_new_tokens``; ``DynamicCache`` concatenates every layer's cache
  on every step instead. Decoding attends with grouped-query matmuls (the query heads of one KV
  head share its keys), without repeating the keys per query head.
- **Weights prepared once.** Every projection's weight is taken in the decoding dtype, with an
  active LoRA adapter merged into this copy (the model itself is not touched), and packed once
  for oneDNN, where a plain bf16 ``linear`` repacks it on every call.

``unsupported_reason(model)`` says when it does not apply; ``ml/generate.py`` falls back to ``model.generate``
otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Prompts up to this many tokens attend through plain matmuls, longer ones through SDPA's fused
# kernel: on our CPU the matmuls were faster on short prompts, much slower once the fp32 scores
# of every head outgrow the cache.
MATMUL_ATTENTION_UP_TO = 352
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class PreparedLinear:
    """One projection as decoding runs it: the effective weight (LoRA merged), packed when oneDNN can."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    packed: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class PreparedNorm:
    """A Llama RMSNorm with its weight in the decoding dtype: the same arithmetic as the module
    (normalised in fp32, rounded, then scaled), without casting the module's own weight."""

    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


@dataclass(frozen=True)
class PreparedLayer:
    input_norm: PreparedNorm
    post_attention_norm: PreparedNorm
    projections: dict[str, PreparedLinear]
    activation: Callable


@dataclass(frozen=True)
class PreparedModel:
    embed: torch.Tensor
    layers: list[PreparedLayer]
    norm: PreparedNorm
    lm_head: PreparedLinear
    rotary: Callable
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


def _llama(model):
    """The ``LlamaForCausalLM`` inside ``model`` (a PeftModel wraps it), or None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) != "llama" or not hasattr(inner, "model") or not hasattr(inner, "lm_head"):
        return None
    return inner


def unsupported_reason(model) -> str | None:
    """Why this decoder cannot run ``model``, or None when it can: CPU, Llama architecture, every
    projection a plain ``Linear`` (possibly under a LoRA layer)."""
    inner = _llama(model)
    if inner is None:
        return "not a Llama-architecture model"
    if next(inner.parameters()).device.type != "cpu":
        return "not on CPU"
    for layer in inner.model.layers:
        modules = [getattr(layer.self_attn, n) for n in PROJECTIONS] + [getattr(layer.mlp, n) for n in MLP_PROJECTIONS]
        for module in modules:
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if type(base) is not torch.nn.Linear:
                return f"a projection is a {type(base).__name__}, not a plain Linear"
            if isinstance(module, BaseTunerLayer) and any(module.use_dora.get(name) for name in module.active_adapters):
                return "a DoRA adapter is active"
    return None


def effective_weight(module) -> torch.Tensor:
    """The weight ``module`` multiplies by: its own, or a LoRA layer's base weight with every active,
    unmerged adapter added (in fp32, then rounded once to the base weight's dtype)."""
    if not isinstance(module, BaseTunerLayer):
        return module.weight
    base = module.get_base_layer().weight
    if module.disable_adapters or module.merged:
        return base
    merged = base.float()
    for name in module.active_adapters:
        if name in module.lora_A:
            merged = merged + module.get_delta_weight(name).float()
    return merged.to(base.dtype)


def _prepare_linear(modules: Sequence, dtype: torch.dtype) -> PreparedLinear:
    """One projection for ``modules`` that read the same input: their weights stacked, so that one
    matmul gives all their outputs side by side."""
    bases = [m.get_base_layer() if isinstance(m, BaseTunerLayer) else m for m in modules]
    weight = torch.cat([effective_weight(m).detach().to(dtype) for m in modules]).contiguous()
    bias = torch.cat([b.bias.detach() for b in bases]).to(dtype) if bases[0].bias is not None else None  # Llama: all or none
    packed = None
    if dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
    return PreparedLinear(weight=weight, bias=bias, packed=packed)


def _prepare_norm(module, dtype: torch.dtype) -> PreparedNorm:
    return PreparedNorm(weight=module.weight.detach().to(dtype), eps=module.variance_epsilon)


def prepare(model, dtype: torch.dtype) -> PreparedModel:
    """``model``'s weights as decoding uses them, in ``dtype``, whatever dtype the model holds them in."""
    inner = _llama(model)
    config = inner.config
    layers = []
    for layer in inner.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        projections = {
            "qkv": _prepare_linear([attention.q_proj, attention.k_proj, attention.v_proj], dtype),
            "o_proj": _prepare_linear([attention.o_proj], dtype),
            "gate_up": _prepare_linear([mlp.gate_proj, mlp.up_proj], dtype),
            "down_proj": _prepare_linear([mlp.down_proj], dtype),
        }
        layers.append(
            PreparedLayer(
                input_norm=_prepare_norm(layer.input_layernorm, dtype),
                post_attention_norm=_prepare_norm(layer.post_attention_layernorm, dtype),
                projections=projections,
                activation=layer.mlp.act_fn,
            )
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return PreparedModel(
        embed=inner.model.embed_tokens.weight.detach().to(dtype),
        layers=layers,
        norm=_prepare_norm(inner.model.norm, dtype),
        lm_head=_prepare_linear([inner.lm_head], dtype),
        rotary=inner.model.rotary_emb,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        dtype=dtype,
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _mlp(layer: PreparedLayer, x: torch.Tensor) -> torch.Tensor:
    gate, up = layer.projections["gate_up"](x).chunk(2, dim=-1)
    return layer.projections["down_proj"](layer.activation(gate) * up)


def _qkv(prepared: PreparedModel, layer: PreparedLayer, x: torch.Tensor):
    q_width = prepared.heads * prepared.head_dim
    kv_width = prepared.kv_heads * prepared.head_dim
    return layer.projections["qkv"](x).split([q_width, kv_width, kv_width], dim=-1)


class KVCache:
    """One key and one value buffer per layer: row r's prompt sits right-aligned before column
    ``prompt_width``, decoded token t at column ``prompt_width + t``; both ``[rows, kv_heads, width, head_dim]``
    (the matmul reads the keys transposed in place, faster here than keys stored transposed). Every step
    attends over the whole width, with ``bias`` -inf where a column is left padding or not yet
    written: a matmul over a slice of the buffer would copy it first."""

    def __init__(self, prepared: PreparedModel, prompt_lengths: Sequence[int], max_new_tokens: int):
        rows, self.prompt_width = len(prompt_lengths), max(prompt_lengths)
        width = self.prompt_width + max_new_tokens
        shape = (rows, prepared.kv_heads, width, prepared.head_dim)
        self.keys = [torch.zeros(shape, dtype=prepared.dtype) for _ in prepared.layers]
        self.values = [torch.zeros(shape, dtype=prepared.dtype) for _ in prepared.layers]
        columns = torch.arange(width)
        starts = torch.tensor([self.prompt_width - n for n in prompt_lengths])
        written = (columns[None, :] >= starts[:, None]) & (columns[None, :] < self.prompt_width)
        self.bias = torch.where(written, 0.0, float("-inf")).to(prepared.dtype)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_bias: torch.Tensor | None) -> torch.Tensor:
    """Causal attention of one prompt, ``q`` ``[1, heads, length, head_dim]`` against ``k``, ``v``
    ``[1, kv_heads, length, head_dim]``: as eager attention computes it (grouped matmuls, softmax
    in fp32) where ``causal_bias`` is given, else torch's fused kernel (faster on long prompts)."""
    if causal_bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    _, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(1, kv_heads, heads // kv_heads * length, head_dim)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).view(1, kv_heads, heads // kv_heads, length, length)
    weights = torch.softmax(scores.float() * head_dim**-0.5 + causal_bias, dim=-1).to(q.dtype)
    return torch.matmul(weights.view(1, kv_heads, -1, length), v).view(1, heads, length, head_dim)


def _prefill_row(prepared: PreparedModel, cache: KVCache, row: int, prompt: Sequence[int]) -> torch.Tensor:
    """Run one prompt through the model at its own length, store its keys and values in ``row``
    of the cache, and return the logits of its last position."""
    length = len(prompt)
    ids = torch.tensor(prompt)
    h = prepared.embed[ids][None]
    cos, sin = prepared.rotary(h, torch.arange(length)[None])
    start = cache.prompt_width - length
    causal_bias = torch.full((length, length), float("-inf")).triu(1) if length <= MATMUL_ATTENTION_UP_TO else None
    for index, layer in enumerate(prepared.layers):
        p = layer.projections
        q, k, v = _qkv(prepared, layer, layer.input_norm(h))
        q = _rotate(q.view(1, length, prepared.heads, prepared.head_dim).transpose(1, 2), cos[:, None], sin[:, None])
        k = _rotate(k.view(1, length, prepared.kv_heads, prepared.head_dim).transpose(1, 2), cos[:, None], sin[:, None])
        v = v.view(1, length, prepared.kv_heads, prepared.head_dim).transpose(1, 2)
        cache.keys[index][row, :, start : cache.prompt_width] = k[0]
        cache.values[index][row, :, start : cache.prompt_width] = v[0]
        attended = _causal_attention(q, k, v, causal_bias)
        h = h + p["o_proj"](attended.transpose(1, 2).reshape(1, length, -1))
        h = h + _mlp(layer, layer.post_attention_norm(h))
    return prepared.lm_head(prepared.norm(h[:, -1]))[0]


def _decode_step(
    prepared: PreparedModel, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, column: int
) -> torch.Tensor:
    """One new token for every row (``tokens`` at ``positions``), written at cache ``column``; the
    logits of the next."""
    rows, groups = tokens.shape[0], prepared.heads // prepared.kv_heads
    h = prepared.embed[tokens]
    cos, sin = prepared.rotary(h, positions[:, None])
    cos, sin = cos[:, :, None], sin[:, :, None]
    cache.bias[:, column] = 0.0
    bias = cache.bias[:, None, None, :]
    scale = prepared.head_dim**-0.5
    for index, layer in enumerate(prepared.layers):
        p = layer.projections
        q, k, v = _qkv(prepared, layer, layer.input_norm(h))
        q = _rotate(q.view(rows, prepared.kv_heads, groups, prepared.head_dim), cos, sin)
        k = _rotate(k.view(rows, prepared.kv_heads, 1, prepared.head_dim), cos, sin)
        cache.keys[index][:, :, column] = k[:, :, 0]
        cache.values[index][:, :, column] = v.view(rows, prepared.kv_heads, prepared.head_dim)
        scores = torch.matmul(q, cache.keys[index].transpose(-1, -2)) * scale + bias
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(prepared.dtype)
        h = h + p["o_proj"](torch.matmul(weights, cache.values[index]).reshape(rows, -1))
        h = h + _mlp(layer, layer.post_attention_norm(h))
    return prepared.lm_head(prepared.norm(h))


def greedy_decode(
    prepared: PreparedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    on_step: Callable[[], None] | None = None,
) -> list[list[int]]:
    """The greedy continuation of every prompt, decoded together, as ``generate`` returns it: rows
    that stopped early are filled with a stop id after it (``generate.cut_at_stop`` removes them);
    ``on_step`` follows each decoding step."""
    cache = KVCache(prepared, [len(p) for p in prompts], max_new_tokens)
    stops = torch.tensor(list(stop_ids))
    with torch.inference_mode():
        tokens = torch.stack([_prefill_row(prepared, cache, row, prompt).argmax(-1) for row, prompt in enumerate(prompts)])
        positions = torch.tensor([len(p) for p in prompts])
        finished = torch.isin(tokens, stops)
        generated = [tokens]
        for step in range(1, max_new_tokens):
            if bool(finished.all()):
                break
            logits = _decode_step(prepared, cache, tokens, positions, cache.prompt_width + step - 1)
            tokens = torch.where(finished, stops[0], logits.argmax(-1))
            positions = positions + 1
            finished = finished | torch.isin(tokens, stops)
            generated.append(tokens)
            if on_step is not None:
                on_step()
    return torch.stack(generated, dim=1).tolist()
