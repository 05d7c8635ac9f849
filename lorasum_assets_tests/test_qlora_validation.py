"""QLoRA on a CPU after inference: bitsandbytes repacks a 4-bit layer for its inference kernel the
first time the layer runs in eval mode without grad (a validation pass, generation), and that
kernel has no backward. Training, merging and exporting must not depend on what ran before them."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import pytest
import torch

from lorasum_assets.ml.data.prompts import encode_example
from lorasum_assets.ml.models.four_bit import FourBitLayoutWarning, evaluating, restore_4bit_layout
from lorasum_assets.ml.models.loading import ModelSpec, load_model, load_tokenizer
from lorasum_assets.ml.training.batching import TrainExample, collate_right
from lorasum_assets.ml.training.loop import train_lora
from lorasum_assets.ml.training.lora import prepare_peft_model
from lorasum_assets.ml.training.loss import evaluate_loss, token_loss_sum
from lorasum_assets.settings.profiles import get_profile


def _examples(tokenizer, n: int, split: str) -> list[TrainExample]:
    text = resources.files("lorasum_assets").joinpath("sample_data/dialogues.jsonl").read_text("utf-8")
    rows = [row for row in map(json.loads, text.splitlines()) if row["split"] == split][:n]
    encoded = [encode_example(tokenizer, row["dialogue"], row["summary"], 512) for row in rows]
    return [TrainExample(e.input_ids, e.labels) for e in encoded]


def _cpu_inference_packed(model) -> int:
    """How many 4-bit layers hold bitsandbytes' CPU inference layout now."""
    weights = {id(m.weight): m.weight for m in model.modules() if getattr(m, "weight", None) is not None}
    return sum(bool(getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False)) for w in weights.values())


def _recipe_spec(**changes):
    """The llama-3.2-3b-qlora profile's training settings (checkpointing, dropout 0.1, q/k/v/o), shortened."""
    return dataclasses.replace(get_profile("llama-3.2-3b-qlora").training, **changes)


def _needs_avx512_bf16() -> None:
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit layers for inference only on CPUs with AVX512-BF16")


@pytest.fixture()
def stand_in(stand_in_dir):
    spec = ModelSpec(model=str(stand_in_dir), quantization="nf4", device="cpu")
    return load_model(spec), load_tokenizer(spec)


def _lora_grads(peft_model, batch) -> dict[str, torch.Tensor]:
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same LoRA dropout mask each time
    loss, _ = token_loss_sum(peft_model, dict(batch), torch.bfloat16)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}


def test_lora_gradients_of_a_batch_are_the_same_after_a_validation_pass(stand_in):
    model, tokenizer = stand_in
    peft_model = prepare_peft_model(model, _recipe_spec())
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which leaves A without gradient: as after some training
            torch.nn.init.normal_(param, std=0.02)
    train, val = _examples(tokenizer, 2, "train"), _examples(tokenizer, 2, "validation")
    batch = collate_right(train, tokenizer.pad_token_id)

    before = _lora_grads(peft_model, batch)
    val_loss = evaluate_loss(peft_model, val, tokenizer.pad_token_id, mixed_precision="bf16")
    after = _lora_grads(peft_model, batch)

    norms = {name: (float(before[name].norm()), float(after[name].norm())) for name in before if "layers.1." in name and "lora_A" in name}
    print(f"validation loss {val_loss:.4f}; 4-bit layers in the inference layout after it: {_cpu_inference_packed(peft_model)}")
    print("layer 1 LoRA-A grad norms, before and after validation:", {k.split(".")[-4]: v for k, v in norms.items()})
    assert all(float(g.norm()) > 0 for name, g in before.items() if "lora_A" in name)
    for name in before:
        assert torch.allclose(after[name], before[name], rtol=1e-5, atol=1e-8), name
    assert _cpu_inference_packed(peft_model) == 0


def test_training_gives_the_same_adapter_with_and_without_validation_and_no_checkpoints(stand_in_dir):
    """Validation reads the model and must not change what it learns. The two runs make the same
    optimizer steps on the same micro-batches with the same seeds, so only a validation pass that
    leaves the model computing otherwise can part them; the tolerance is float noise, orders of
    magnitude below the 0.23 relative gap the repacked layers made."""
    spec = ModelSpec(model=str(stand_in_dir), quantization="nf4", device="cpu")
    tokenizer = load_tokenizer(spec)
    train, val = _examples(tokenizer, 8, "train"), _examples(tokenizer, 2, "validation")
    train_spec = _recipe_spec(epochs=2, batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3, warmup_ratio=0.0)
    adapters, packed = {}, {}
    for name, validation in (("with", val), ("without", [])):
        peft_model = prepare_peft_model(load_model(spec), train_spec)
        result = train_lora(peft_model, train, validation, train_spec, tokenizer.pad_token_id, checkpoint_dir=None)
        assert result.total_steps == 4 and sum(v is not None for v in result.val_losses) == (2 if validation else 0)
        packed[name] = _cpu_inference_packed(peft_model)
        adapters[name] = {k: v.detach().clone() for k, v in peft_model.named_parameters() if "lora_" in k}
    gap = max(float((adapters["with"][k] - adapters["without"][k]).abs().max() / adapters["without"][k].abs().max())
              for k in adapters["without"])
    print(f"4-bit layers left in the inference layout: with validation {packed['with']}, without {packed['without']}; "
          f"largest relative gap between the adapters' LoRA weights {gap:.2e}")
    assert gap <= 1e-5
    assert packed == {"with": 0, "without": 0}


def test_a_backward_through_bitsandbytes_inference_kernel_fails_the_suite(stand_in):
    """The trap itself, on a CPU with AVX512-BF16 (bitsandbytes repacks only there), and the suite's
    guard against it: setup.cfg turns torch.autograd's and bitsandbytes' UserWarnings into errors: this one says
    that no gradient flows back through a 4-bit layer."""
    _needs_avx512_bf16()
    model, _ = stand_in
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 3, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)  # eval mode, no grad: bitsandbytes repacks the layer for inference
    assert _cpu_inference_packed(layer) == 1
    with pytest.raises(UserWarning, match="autograd kernel was not registered"):
        layer(x.requires_grad_()).sum().backward()


def test_a_4_bit_model_that_generated_dequantizes_to_its_weights_once_restored(stand_in, stand_in_dir):
    """A merge dequantizes the base. Dequantizing a layer bitsandbytes repacked for inference gives
    garbage; restored, it gives the weights again, up to the inverse's re-quantization of the
    absmax (through bf16, 8 bits: a few 1e-3 of the layer's largest weight, hence the 1e-2 bound)."""
    model, _ = stand_in
    fresh = dict(load_model(ModelSpec(model=str(stand_in_dir), quantization="nf4", device="cpu")).dequantize().named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"

    def gap(dequantized) -> float:
        ours, theirs = dict(dequantized.named_parameters())[name].detach(), fresh[name].detach()
        return float((ours - theirs).abs().max() / theirs.abs().max())

    def generated():
        model = load_model(ModelSpec(model=str(stand_in_dir), quantization="nf4", device="cpu"))
        with torch.no_grad():
            model(torch.tensor([[1, 40, 41, 42]]))
        return model

    unrestored, restored = generated(), generated()
    repacked = _cpu_inference_packed(restored)
    assert restore_4bit_layout(restored) == repacked and _cpu_inference_packed(restored) == 0
    gaps = gap(unrestored.dequantize()), gap(restored.dequantize())
    print(f"{repacked} layers repacked by a forward pass; {name} dequantized after it, relative to a fresh load's: "
          f"{gaps[0]:.4f} as left, {gaps[1]:.4f} restored")
    assert gaps[1] <= 1e-2
    if repacked:
        assert gaps[0] > 0.5


def test_a_4_bit_layer_repacked_while_a_model_trains_is_restored_and_said(stand_in):
    """The safety net, should a bitsandbytes upgrade repack layers in training mode too."""
    _needs_avx512_bf16()
    model, _ = stand_in
    peft_model = prepare_peft_model(model, _recipe_spec())
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    peft_model.train()
    with pytest.warns(FourBitLayoutWarning, match="repacked 1 4-bit layers") as said, evaluating(peft_model), torch.no_grad():
        layer.eval()  # what such an upgrade would amount to
        layer(torch.randn(1, 2, layer.in_features, dtype=torch.bfloat16))
        layer.train()
    print(said[0].message)
    assert _cpu_inference_packed(peft_model) == 0 and peft_model.training and layer.training
