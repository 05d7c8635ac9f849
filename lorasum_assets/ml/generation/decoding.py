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
  for oneDNN, where a plain bf16 ``linear`` repacks it on every call. Attention's scale is folded
  into the query rows, so scores come out of one ``baddbmm`` with the mask added, and the softmax
  runs on them in the decoding dtype (torch computes it in fp32 inside).

``unsupported_reason(model)`` says when it does not apply; ``ml/generation/generate.py`` falls back to ``model.generate``
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
# kernel: on our CPU the matmuls were faster on short prompts, slower once the scores of every
# head outgrow the cache.
MATMUL_ATTENTION_UP_TO = 352
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class PreparedLinear:
    """One projection as decoding runs it: the effective weight (LoRA merged), in oneDNN's packed
    layout when ``packed``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    packed: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class PreparedNorm:
    """A Llama RMSNorm with its weight in the decoding dtype, in torch's fused kernel (normalised and
    scaled in fp32, rounded once), without casting the module's own weight."""

    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


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
    applied = {id(module) for layer in inner.model.layers
               for module in [getattr(layer.self_attn, n) for n in PROJECTIONS] + [getattr(layer.mlp, n) for n in MLP_PROJECTIONS]}
    applied.add(id(inner.lm_head))
    for name, module in inner.named_modules():
        if isinstance(module, BaseTunerLayer) and id(module) not in applied and module.active_adapters and not module.disable_adapters:
            return f"a LoRA adapter on {name.rsplit('.', 1)[-1]}, which this decoder does not apply"
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


def onednn_packs_bf16() -> bool:
    """Whether oneDNN can pack bf16 weights on this CPU: it needs AVX512 (BW, VL, DQ) or AVX-NE-CONVERT.
    Elsewhere the decoder keeps its bf16 weights unpacked (correct, and slower)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _prepare_linear(modules: Sequence, dtype: torch.dtype, scales: Sequence[float] | None = None) -> PreparedLinear:
    """One projection for ``modules`` that read the same input: their weights stacked, so that one
    matmul gives all their outputs side by side, each module's rows (and bias) times its entry of
    ``scales``. Each weight is rounded to ``dtype`` as it is copied into the stack."""
    scales = scales or [1.0] * len(modules)
    bases = [m.get_base_layer() if isinstance(m, BaseTunerLayer) else m for m in modules]
    weights = [effective_weight(m).detach() for m in modules]
    weight = torch.empty(sum(w.shape[0] for w in weights), weights[0].shape[1], dtype=dtype)
    for rows, source, scale in zip(weight.split([w.shape[0] for w in weights]), weights, scales):
        rows.copy_(source if scale == 1.0 else source * scale)
    bias = None
    if bases[0].bias is not None:  # Llama: all or none
        bias = torch.cat([b.bias.detach() * scale for b, scale in zip(bases, scales)]).to(dtype)
    if dtype == torch.bfloat16 and onednn_packs_bf16():
        return PreparedLinear(weight=torch.ops.mkldnn._reorder_linear_weight(weight, 16), bias=bias, packed=True)
    return PreparedLinear(weight=weight, bias=bias, packed=False)


def _prepare_norm(module, dtype: torch.dtype) -> PreparedNorm:
    return PreparedNorm(weight=module.weight.detach().to(dtype), eps=module.variance_epsilon)


def prepare(model, dtype: torch.dtype) -> PreparedModel:
    """``model``'s weights as decoding uses them, in ``dtype``, whatever dtype the model holds them in."""
    inner = _llama(model)
    config = inner.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # Attention's 1/sqrt(head_dim) goes into the query rows once (exact when it is a power of two).
    attention_scales = [head_dim**-0.5, 1.0, 1.0]
    layers = []
    for layer in inner.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        projections = {
            "qkv": _prepare_linear([attention.q_proj, attention.k_proj, attention.v_proj], dtype, attention_scales),
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


def _attention_inputs(prepared: PreparedModel, layer: PreparedLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The queries and keys of ``h`` ``[tokens, hidden]``, rotated together in one pass and each
    ``[tokens, heads, head_dim]``, and the values."""
    heads, kv_heads = prepared.heads, prepared.kv_heads
    qkv = layer.projections["qkv"](layer.input_norm(h)).view(h.shape[0], heads + 2 * kv_heads, prepared.head_dim)
    rotated = _rotate(qkv[:, : heads + kv_heads], cos, sin)
    return rotated[:, :heads], rotated[:, heads:], qkv[:, heads + kv_heads :]


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


def _attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Batched attention of already scaled ``queries`` ``[batch, queries, head_dim]`` over ``keys``,
    ``values`` ``[batch, keys, head_dim]``, ``bias`` added to the scores inside the matmul: each batch
    entry holds the query heads that share one KV head."""
    return torch.bmm(torch.softmax(torch.baddbmm(bias, queries, keys.transpose(1, 2)), dim=-1), values)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_bias: torch.Tensor | None) -> torch.Tensor:
    """Causal attention of one prompt, ``q`` ``[heads, length, head_dim]`` (already scaled) against
    ``k``, ``v`` ``[kv_heads, length, head_dim]``: grouped matmuls (the query heads of one KV head
    stacked, ``causal_bias`` ``[groups * length, length]`` added in the matmul) where ``causal_bias``
    is given, else torch's fused kernel (faster on long prompts)."""
    if causal_bias is None:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=1.0, enable_gqa=True)[0]
    heads, length, head_dim = q.shape
    grouped = q.reshape(k.shape[0], heads // k.shape[0] * length, head_dim)
    return _attend(grouped, k, v, causal_bias).view(heads, length, head_dim)


def _causal_bias(length: int, groups: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The causal mask of a prompt as an additive bias for ``groups`` stacked query heads, or None
    where the prompt is long enough for SDPA."""
    if length > MATMUL_ATTENTION_UP_TO:
        return None
    return torch.full((length, length), float("-inf"), dtype=dtype).triu(1).repeat(groups, 1)


def _prefill_row(prepared: PreparedModel, cache: KVCache, row: int, prompt: Sequence[int]) -> torch.Tensor:
    """Run one prompt through the model at its own length, store its keys and values in ``row``
    of the cache, and return the logits of its last position."""
    length = len(prompt)
    h = prepared.embed[torch.tensor(prompt)]
    cos, sin = prepared.rotary(h[None], torch.arange(length)[None])
    cos, sin = cos[0, :, None], sin[0, :, None]
    start = cache.prompt_width - length
    causal_bias = _causal_bias(length, prepared.heads // prepared.kv_heads, prepared.dtype)
    for index, layer in enumerate(prepared.layers):
        q, k, v = _attention_inputs(prepared, layer, h, cos, sin)
        keys = cache.keys[index][row, :, start : cache.prompt_width]
        values = cache.values[index][row, :, start : cache.prompt_width]
        keys.copy_(k.transpose(0, 1))
        values.copy_(v.transpose(0, 1))
        attended = _causal_attention(q.transpose(0, 1), keys, values, causal_bias)
        h = h + layer.projections["o_proj"](attended.transpose(0, 1).reshape(length, -1))
        h = h + _mlp(layer, layer.post_attention_norm(h))
    return prepared.lm_head(prepared.norm(h[-1:]))[0]


def _decode_step(
    prepared: PreparedModel, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, column: int
) -> torch.Tensor:
    """One new token for every row (``tokens`` at ``positions``), written at cache ``column``; the
    logits of the next. Each row's query heads attend, grouped by KV head, over the whole cache width."""
    rows, kv_heads, head_dim = tokens.shape[0], prepared.kv_heads, prepared.head_dim
    groups = prepared.heads // kv_heads
    h = prepared.embed[tokens]
    cos, sin = prepared.rotary(h[:, None], positions[:, None])
    cache.bias[:, column] = 0.0
    bias = cache.bias[:, None, None, :].expand(rows, kv_heads, groups, -1).reshape(rows * kv_heads, groups, -1)
    for index, layer in enumerate(prepared.layers):
        q, k, v = _attention_inputs(prepared, layer, h, cos, sin)
        keys, values = cache.keys[index], cache.values[index]
        keys[:, :, column] = k
        values[:, :, column] = v
        attended = _attend(q.reshape(rows * kv_heads, groups, head_dim), keys.view(rows * kv_heads, -1, head_dim),
                           values.view(rows * kv_heads, -1, head_dim), bias)
        h = h + layer.projections["o_proj"](attended.view(rows, -1))
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
