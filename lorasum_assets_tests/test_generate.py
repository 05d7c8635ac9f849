"""Honest base predictions and batched = one-at-a-time greedy generation."""

import json
from importlib import resources

import pytest

from lorasum_assets.ml.generate import generate, generate_with_adapter, has_active_adapter
from lorasum_assets.ml.modeling import ModelSpec, load_model
from lorasum_assets.ml.prompts import encode_prompt
from lorasum_assets.ml.specs import GenerationSpec, TrainSpec
from lorasum_assets.ml.train import prepare_peft_model, save_adapter, train_lora

from .test_train import examples


def prompts(tokenizer, split="test"):
    text = resources.files("lorasum_assets").joinpath("sample_data/dialogues.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if json.loads(line)["split"] == split]
    return [encode_prompt(tokenizer, r["dialogue"])[0] for r in rows]


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    spec = TrainSpec(epochs=3, batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-2, warmup_ratio=0.0, lora_dropout=0.0, gradient_checkpointing=False)
    peft_model = prepare_peft_model(load_model(ModelSpec(model=str(tiny_model_dir), device="cpu")), spec)
    train_lora(peft_model, examples(tiny_tokenizer, 16), [], spec, tiny_tokenizer.pad_token_id)
    return save_adapter(peft_model, tiny_tokenizer, tmp_path_factory.mktemp("adapter") / "adapter")


def test_base_predictions_are_untouched_by_an_adapter_loaded_earlier(tiny_model_dir, tiny_tokenizer, trained_adapter):
    spec = GenerationSpec(max_new_tokens=16, batch_size=4)
    test_prompts = prompts(tiny_tokenizer)
    clean = generate(load_model(ModelSpec(model=str(tiny_model_dir), device="cpu")), tiny_tokenizer, test_prompts, spec)

    shared_base = load_model(ModelSpec(model=str(tiny_model_dir), device="cpu"))
    tuned = generate_with_adapter(shared_base, str(trained_adapter), tiny_tokenizer, test_prompts, spec)
    assert not has_active_adapter(shared_base)
    after = generate(shared_base, tiny_tokenizer, test_prompts, spec)

    assert [g.text for g in after] == [g.text for g in clean]
    assert [g.text for g in tuned] != [g.text for g in clean]  # the adapter really was in play


def test_the_notebooks_contamination_is_real_and_detected(tiny_model_dir, tiny_tokenizer, trained_adapter):
    """Without unload(), PeftModel.from_pretrained leaves LoRA layers in the base: we refuse it."""
    from peft import PeftModel

    from lorasum_assets.resources import LoraModelResource, ProfileResource

    resource = LoraModelResource(profile=ProfileResource(name="tiny"), model=str(tiny_model_dir), device="cpu")
    base = resource.base_model()
    PeftModel.from_pretrained(base, str(trained_adapter))
    assert has_active_adapter(base)
    with pytest.raises(RuntimeError, match="contaminated"):
        resource.base_model()


def test_batched_left_padded_greedy_matches_one_at_a_time(tiny_model_dir, tiny_tokenizer, trained_adapter):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(ModelSpec(model=str(tiny_model_dir), device="cpu")), str(trained_adapter))
    model.eval()
    test_prompts = prompts(tiny_tokenizer) + prompts(tiny_tokenizer, "validation")
    lengths = {len(p) for p in test_prompts}
    assert len(lengths) > 5  # real left padding happens
    batched = generate(model, tiny_tokenizer, test_prompts, GenerationSpec(max_new_tokens=20, batch_size=8))
    single = generate(model, tiny_tokenizer, test_prompts, GenerationSpec(max_new_tokens=20, batch_size=1))
    same = sum(a.text == b.text for a, b in zip(batched, single))
    assert same / len(test_prompts) >= 0.95, [(a.text, b.text) for a, b in zip(batched, single) if a.text != b.text]
    assert all(g.new_tokens <= 20 for g in batched)
    assert all(g.hit_limit == (g.new_tokens == 20) for g in batched)


def test_generation_stops_at_eos_and_decodes_only_new_tokens(tiny_model_dir, tiny_tokenizer):
    model = load_model(ModelSpec(model=str(tiny_model_dir), device="cpu"))
    out = generate(model, tiny_tokenizer, prompts(tiny_tokenizer)[:2], GenerationSpec(max_new_tokens=5, batch_size=2))
    for g in out:
        assert "Summarize the following" not in g.text
        assert g.new_tokens <= 5 and g.latency_s > 0


def test_generation_batches_bound_their_padding():
    from lorasum_assets.ml.generate import plan_generation_batches

    lengths = [128, 174, 174, 181, 185, 194, 195, 200, 219, 224, 226, 241, 245, 332, 348, 442]
    batches = plan_generation_batches(lengths, batch_size=16, max_padding_share=0.25)
    assert sorted(i for b in batches for i in b) == list(range(16))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) == 1 or width * len(batch) <= 1.25 * sum(lengths[i] for i in batch)
    assert len(batches) > 1
    assert plan_generation_batches(lengths, batch_size=4, max_padding_share=10.0) == [list(range(i, i + 4)) for i in range(0, 16, 4)]
