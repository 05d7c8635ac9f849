"""CUDA-only checks of the 4-bit QLoRA path in fp16 (with the grad scaler) and bf16: run by
``benchmarks/gpu_check.sh`` (``pytest -m gpu``), skipped on a machine without CUDA.

For each model and precision: the base loads in 4-bit NF4 on the GPU, LoRA trains for a few dozen
steps, the loss falls, the base weights stay bit-identical and the adapters fp32, the saved adapter
reloads to the same logits, and batched greedy generation matches one-at-a-time.
``GPU_CHECK_MODEL`` (a hub id or local folder) adds a model to the tiny one.
"""

from __future__ import annotations

import os

import pytest
import torch

from lorasum_assets.settings.specs import TINY_MODEL

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: benchmarks/gpu_check.sh runs these where one is"),
]
MODELS = [TINY_MODEL] + ([os.environ["GPU_CHECK_MODEL"]] if os.environ.get("GPU_CHECK_MODEL") else [])


@pytest.mark.parametrize("precision,dtype", [("fp16", "float16"), ("bf16", "bfloat16")])
@pytest.mark.parametrize("model_name", MODELS)
def test_qlora_trains_saves_reloads_and_generates_on_cuda(model_name, precision, dtype, tmp_path):
    from peft import PeftModel

    from lorasum_assets.ml.adapter_files import save_adapter
    from lorasum_assets.ml.batching import TrainExample, collate_right
    from lorasum_assets.ml.data import normalise
    from lorasum_assets.ml.generate import generate
    from lorasum_assets.ml.model_setup import prepare_peft_model
    from lorasum_assets.ml.modeling import ModelSpec, load_model, load_tokenizer
    from lorasum_assets.ml.prompts import encode_example, encode_prompt
    from lorasum_assets.ml.readers import read_sample
    from lorasum_assets.ml.train import train_lora
    from lorasum_assets.settings.specs import GenerationSpec, TrainSpec

    dialogues = normalise(read_sample(), "sample").dialogues
    spec = ModelSpec(model=model_name, quantization="nf4", compute_dtype=dtype, device="cuda", cache_dir=str(tmp_path / "models"))
    tokenizer = load_tokenizer(spec)
    examples = [TrainExample(e.input_ids, e.labels) for e in
                (encode_example(tokenizer, d.dialogue, d.references[0], 512) for d in dialogues if d.split == "train")][:16]
    model = load_model(spec)
    assert model.is_loaded_in_4bit and next(model.parameters()).is_cuda
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}
    train_spec = TrainSpec(epochs=6, batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3 if model_name == TINY_MODEL else 1e-3,
                           warmup_ratio=0.0, lora_dropout=0.0, mixed_precision=precision)
    peft_model = prepare_peft_model(model, train_spec)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad), "adapters are not fp32"

    result = train_lora(peft_model, examples, examples[:4], train_spec, tokenizer.pad_token_id)
    first, last = result.steps[0].loss, result.steps[-1].loss
    assert all(s.loss == s.loss for s in result.steps) and last < first, f"loss {first:.3f} -> {last:.3f}"
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in peft_model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(v, after[k]) for k, v in frozen.items() if k in after), "base weights changed"

    target = save_adapter(peft_model, tokenizer, tmp_path / f"adapter-{precision}")
    batch = {k: v.cuda() for k, v in collate_right(examples[:4], tokenizer.pad_token_id).items() if k != "labels"}
    with torch.no_grad():
        trained = peft_model(**batch).logits.float()
        reloaded = PeftModel.from_pretrained(load_model(spec), target)(**batch).logits.float()
    assert float((trained - reloaded).abs().max()) < 1e-2

    prompts = [encode_prompt(tokenizer, d.dialogue)[0] for d in dialogues if d.split == "test"]
    peft_model.eval()
    batched = generate(peft_model, tokenizer, prompts, GenerationSpec(max_new_tokens=30, batch_size=12))
    single = generate(peft_model, tokenizer, prompts, GenerationSpec(max_new_tokens=30, batch_size=1))
    same = sum(a.text == b.text for a, b in zip(batched, single)) / len(prompts)
    assert same >= 0.9, f"batched greedy matches one-at-a-time on only {same:.0%}"
