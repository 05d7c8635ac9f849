"""Every generation engine, in each of its dtypes, checked whatever the host: the lorasum decoder
with oneDNN-packed bf16 weights and in fp32, and ``transformers`` generate in bf16 and in fp32.
Which one ``auto`` picks depends on the CPU; these tests force each. A test that needs a feature
the host lacks skips and names it; ``-rs`` in the test commands lists the skips in CI's output."""

import pytest
import torch

from lorasum_assets.ml.generation import decoding
from lorasum_assets.ml.generation.decoding import onednn_packs_bf16
from lorasum_assets.ml.generation.generate import chosen_decoder, generate
from lorasum_assets.ml.models.loading import ModelSpec, load_model
from lorasum_assets.ml.models.precision import weights_in
from lorasum_assets.settings.specs import GenerationSpec
from lorasum_assets_tests.helpers import model_logits, prompts

# engine name: (GenerationSpec.decoder, GenerationSpec.precision, the dtype the weights are held in)
ENGINES = {
    "lorasum-packed-bf16": ("lorasum", "bf16", "bfloat16"),
    "lorasum-fp32": ("lorasum", "as_loaded", "float32"),
    "transformers-bf16": ("transformers", "bf16", "bfloat16"),
    "transformers-fp32": ("transformers", "as_loaded", "float32"),
}


def missing_feature(name: str) -> str | None:
    if name == "lorasum-packed-bf16" and not onednn_packs_bf16():
        return "oneDNN cannot pack bf16 weights here (no oneDNN, or a CPU without AVX512 BW/VL/DQ or AVX-NE-CONVERT)"
    return None


@pytest.fixture(params=list(ENGINES))
def engine(request) -> str:
    if reason := missing_feature(request.param):
        pytest.skip(f"{request.param}: {reason}")
    return request.param


def test_each_engine_runs_as_forced_records_itself_and_batches_like_one_at_a_time(engine, tiny_model, tiny_tokenizer):
    decoder, precision, dtype = ENGINES[engine]
    test_prompts = prompts(tiny_tokenizer) + prompts(tiny_tokenizer, "validation")
    assert len({len(p) for p in test_prompts}) > 5  # batches really are padded (left, for generate)
    batched = generate(tiny_model, tiny_tokenizer, test_prompts, GenerationSpec(max_new_tokens=16, batch_size=8, decoder=decoder, precision=precision))
    single = generate(tiny_model, tiny_tokenizer, test_prompts, GenerationSpec(max_new_tokens=16, batch_size=1, decoder=decoder, precision=precision))
    same = sum(a.text == b.text for a, b in zip(batched, single, strict=True)) / len(test_prompts)
    print(f"engine {engine} ran: {batched.engine.short()} on {batched.engine.device}; batched = one at a time on {same:.0%}")
    assert (batched.engine.engine, batched.engine.dtype) == (decoder, dtype)
    assert batched.engine.torch == torch.__version__
    assert same >= 0.95
    assert next(tiny_model.parameters()).dtype == torch.float32  # the model is left as it was loaded


def _relative_gap(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).abs().max() / reference.abs().max())


def test_packed_bf16_decoding_is_as_close_to_the_model_as_its_own_bf16_rounding(tiny_model, tiny_tokenizer):
    """The shipped path on a bf16 CPU, against the model's own fp32 logits. The tolerance is the
    model's own bf16 rounding, measured here: the same model held in bf16 and run by transformers.
    The decoder (same rounding, other operation order) may be at most twice as far."""
    if reason := missing_feature("lorasum-packed-bf16"):
        pytest.skip(reason)
    prepared = decoding.prepare(tiny_model, torch.bfloat16)
    assert all(p.packed for layer in prepared.layers for p in layer.projections.values())
    batch = prompts(tiny_tokenizer)[:4]
    cache = decoding.KVCache(prepared, [len(p) for p in batch], max_new_tokens=4)
    worst_decoder = worst_rounding = 0.0
    for row, prompt in enumerate(batch):
        with torch.inference_mode():
            ours = decoding._prefill_row(prepared, cache, row, prompt).float()
        reference = model_logits(tiny_model, prompt)
        with weights_in(tiny_model, torch.bfloat16):
            rounded = model_logits(tiny_model, prompt)
        worst_decoder = max(worst_decoder, _relative_gap(ours, reference))
        worst_rounding = max(worst_rounding, _relative_gap(rounded, reference))
    print(f"largest logit gap to the fp32 model, as a share of its largest logit: packed bf16 decoder {worst_decoder:.4f}, "
          f"the model itself in bf16 {worst_rounding:.4f}")
    assert 0 < worst_rounding and worst_decoder <= 2 * worst_rounding


def test_the_decoder_runs_llama_3_2s_rope_scaling_and_tied_embeddings(stand_in_dir, tiny_tokenizer):
    """The 4-bit stand-in dequantized to fp32: llama3 rope scaling, tied embeddings, GQA."""
    model = load_model(ModelSpec(model=str(stand_in_dir), quantization="nf4", device="cpu")).dequantize().float().eval()
    config = model.config
    assert config.rope_parameters["rope_type"] == "llama3" and config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert decoding.unsupported_reason(model) is None
    prepared = decoding.prepare(model, torch.float32)
    # positions beyond the original context's low-frequency band: where llama3 scaling changes the angles
    prompt = [1] + list(range(20, 20 + 700))
    cache = decoding.KVCache(prepared, [len(prompt)], max_new_tokens=2)
    with torch.inference_mode():
        ours = decoding._prefill_row(prepared, cache, 0, prompt).float()
    torch.testing.assert_close(ours, model_logits(model, prompt), atol=1e-4, rtol=1e-4)


def _lora(model, **config):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config)).eval()


@pytest.mark.parametrize("case, reason", [
    ("not llama", "not a Llama-architecture model"),
    ("not on cpu", "not on CPU"),
    ("sequential projection", "a projection is a Sequential, not a plain Linear"),
    ("dora", "a DoRA adapter is active"),
    ("lora on embed_tokens", "a LoRA adapter on embed_tokens, which this decoder does not apply"),
])
def test_every_reason_the_decoder_falls_back_is_given(tiny_model, case, reason):
    model = tiny_model
    if case == "not llama":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    elif case == "not on cpu":
        model = model.to("meta")
    elif case == "sequential projection":
        model.model.layers[0].mlp.up_proj = torch.nn.Sequential(model.model.layers[0].mlp.up_proj)
    elif case == "dora":
        model = _lora(model, target_modules=["q_proj", "v_proj"], use_dora=True)
    else:
        model = _lora(model, target_modules=["q_proj", "embed_tokens"])
    assert decoding.unsupported_reason(model) == reason
    assert chosen_decoder(model, GenerationSpec(), torch.bfloat16) == "transformers"
    with pytest.raises(ValueError, match=f"cannot generate here: {reason}"):
        chosen_decoder(model, GenerationSpec(decoder="lorasum"), torch.bfloat16)


def test_lora_on_every_projection_and_the_head_is_applied_by_the_decoder(tiny_model, tiny_tokenizer):
    model = _lora(tiny_model, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])
    assert decoding.unsupported_reason(model) is None
    prepared = decoding.prepare(model, torch.float32)
    prompt = prompts(tiny_tokenizer)[0]
    cache = decoding.KVCache(prepared, [len(prompt)], max_new_tokens=2)
    with torch.inference_mode():
        ours = decoding._prefill_row(prepared, cache, 0, prompt).float()
    torch.testing.assert_close(ours, model_logits(model, prompt), atol=1e-4, rtol=1e-4)
