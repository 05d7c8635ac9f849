"""The lorasum decoder computes what the model computes: the same logits unpadded and padded, with a
LoRA adapter merged only into its own copy of the weights, and the same greedy summaries."""

import pytest
import torch

from lorasum_assets.ml.generation import decoding
from lorasum_assets.ml.generation.generate import chosen_decoder, generate, generate_with_adapter, has_active_adapter
from lorasum_assets.ml.models.loading import ModelSpec, load_model
from lorasum_assets.settings.specs import GenerationSpec
from lorasum_assets_tests.helpers import model_logits, prompts


def decoder_logits(model, batch: list[list[int]], next_tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's logits after each prompt of ``batch`` (prefilled one by one), and after one
    decoding step that feeds ``next_tokens`` to the whole batch."""
    prepared = decoding.prepare(model, torch.float32)
    cache = decoding.KVCache(prepared, [len(p) for p in batch], max_new_tokens=4)
    with torch.inference_mode():
        prefill = torch.stack([decoding._prefill_row(prepared, cache, row, p) for row, p in enumerate(batch)])
        step = decoding._decode_step(
            prepared, cache, torch.tensor(next_tokens), torch.tensor([len(p) for p in batch]), cache.prompt_width
        )
    return prefill.float(), step.float()


@pytest.mark.parametrize("attention", ["matmul", "sdpa"])
def test_the_decoder_gives_the_models_logits_for_prompts_of_different_lengths(tiny_model, tiny_tokenizer, monkeypatch, attention):
    batch = prompts(tiny_tokenizer)[:4]
    assert max(len(p) for p in batch) <= decoding.MATMUL_ATTENTION_UP_TO
    if attention == "sdpa":  # as prompts longer than the threshold attend
        monkeypatch.setattr(decoding, "MATMUL_ATTENTION_UP_TO", 0)
    assert len({len(p) for p in batch}) > 1  # rows really are padded in the cache
    next_tokens = [11, 12, 13, 14]
    prefill, step = decoder_logits(tiny_model, batch, next_tokens)
    for row, prompt in enumerate(batch):
        torch.testing.assert_close(prefill[row], model_logits(tiny_model, prompt), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step[row], model_logits(tiny_model, prompt + [next_tokens[row]]), atol=1e-4, rtol=1e-4)


def test_a_merged_adapter_gives_the_unmerged_adapters_logits_and_leaves_the_model_alone(
    tiny_model_dir, tiny_tokenizer, trained_adapter  # noqa: F811
):
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(load_model(ModelSpec(model=str(tiny_model_dir), device="cpu")), str(trained_adapter))
    tuned.eval()
    before = {name: p.detach().clone() for name, p in tuned.named_parameters()}
    batch = prompts(tiny_tokenizer)[:3]
    prefill, step = decoder_logits(tuned, batch, [21, 22, 23])
    for row, prompt in enumerate(batch):
        torch.testing.assert_close(prefill[row], model_logits(tuned, prompt), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step[row], model_logits(tuned, prompt + [21 + row]), atol=1e-4, rtol=1e-4)
    with tuned.disable_adapter():
        assert not torch.allclose(prefill[0], model_logits(tuned, batch[0]), atol=1e-3)  # the adapter was in play
    assert all(torch.equal(p, before[name]) for name, p in tuned.named_parameters())
    assert has_active_adapter(tuned)
    assert not any(getattr(m, "merged", False) for m in tuned.modules())


def test_greedy_summaries_equal_generates_in_fp32(tiny_model_dir, tiny_tokenizer, trained_adapter):  # noqa: F811
    test_prompts = prompts(tiny_tokenizer) + prompts(tiny_tokenizer, "validation")
    texts = {}
    for decoder in ("lorasum", "transformers"):
        spec = GenerationSpec(max_new_tokens=20, batch_size=8, precision="as_loaded", decoder=decoder)
        base = load_model(ModelSpec(model=str(tiny_model_dir), device="cpu"))
        out = generate(base, tiny_tokenizer, test_prompts, spec)
        out += generate_with_adapter(base, str(trained_adapter), tiny_tokenizer, test_prompts, spec)
        texts[decoder] = [(g.text, g.new_tokens, g.hit_limit) for g in out]
    assert texts["lorasum"] == texts["transformers"]
    assert len({t for t, _, _ in texts["lorasum"]}) > 1


def test_auto_takes_the_lorasum_decoder_only_for_greedy_bf16(tiny_model):
    greedy = GenerationSpec()
    assert chosen_decoder(tiny_model, greedy, torch.bfloat16) == "lorasum"
    assert chosen_decoder(tiny_model, greedy, None) == "transformers"  # fp32 as loaded: generate's exact outputs
    assert chosen_decoder(tiny_model, GenerationSpec(do_sample=True), torch.bfloat16) == "transformers"
    assert chosen_decoder(tiny_model, GenerationSpec(decoder="transformers"), torch.bfloat16) == "transformers"
    assert chosen_decoder(tiny_model, GenerationSpec(decoder="lorasum"), None) == "lorasum"
    with pytest.raises(ValueError, match="decodes greedily only"):
        chosen_decoder(tiny_model, GenerationSpec(decoder="lorasum", do_sample=True), torch.bfloat16)
