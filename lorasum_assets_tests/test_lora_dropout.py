"""LoRA dropout with packed random bits: the drop probability, the scaling, the gradient, the seed,
and that gradient checkpointing recomputes the same masks."""

import pytest
import torch

from lorasum_assets.ml.models.loading import ModelSpec, load_model
from lorasum_assets.ml.training.loop import TrainSpec, train_lora
from lorasum_assets.ml.training.lora import prepare_peft_model
from lorasum_assets.ml.training.lora_dropout import PackedBitsDropout, drop_threshold, keep_mask, lora_dropout_mask_for
from lorasum_assets_tests.helpers import examples


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_the_mask_drops_p_of_the_elements_in_each_of_the_four_lanes_of_a_random_word(p):
    torch.manual_seed(0)
    n = 4_000_000
    dropped = (~keep_mask((n,), p)).double()
    assert drop_threshold(p) / 2**15 == pytest.approx(p, abs=2e-5)
    sigma = (p * (1 - p) / n) ** 0.5
    assert float(dropped.mean()) == pytest.approx(p, abs=5 * sigma)
    for lane in range(4):  # each 64-bit word gives four elements; the top one has a bit that is always 0
        assert float(dropped[lane::4].mean()) == pytest.approx(p, abs=10 * sigma), lane


def test_kept_values_are_scaled_to_keep_the_expectation_and_the_gradient_is_the_scaled_mask():
    torch.manual_seed(0)
    dropout = PackedBitsDropout(0.1)
    x = torch.randn(3, 50, 64, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    scale = 2**15 / (2**15 - drop_threshold(0.1))
    assert torch.allclose(y[kept], x[kept] * scale)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, kept.float() * scale)
    ones = torch.ones(1_000_000)
    assert float(dropout(ones).mean()) == pytest.approx(1.0, abs=0.002)
    bf16 = dropout(torch.ones(10, dtype=torch.bfloat16))
    assert bf16.dtype == torch.bfloat16
    dropout.eval()
    assert dropout(x) is x


def test_the_same_seed_draws_the_same_masks():
    dropout = PackedBitsDropout(0.3)
    x = torch.randn(1000)
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(dropout(x), first)


def lora_dropouts(peft_model) -> list:
    return [d for m in peft_model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
            for d in m.lora_dropout.values()]


def test_lora_layers_get_packed_bits_dropout_on_cpu_unless_torch_is_asked_for(tiny_model_dir):
    from peft import get_peft_model_state_dict

    def prepared(**settings):
        return prepare_peft_model(load_model(ModelSpec(model=str(tiny_model_dir), device="cpu")), TrainSpec(**settings))

    packed, plain, none = prepared(), prepared(lora_dropout_mask="torch"), prepared(lora_dropout=0.0)
    assert [type(d) for d in lora_dropouts(packed)] == [PackedBitsDropout] * 8  # q/k/v/o in 2 layers
    assert {d.p for d in lora_dropouts(packed)} == {TrainSpec().lora_dropout}
    assert [type(d) for d in lora_dropouts(plain)] == [torch.nn.Dropout] * 8
    assert [type(d) for d in lora_dropouts(none)] == [torch.nn.Identity] * 8
    assert get_peft_model_state_dict(packed).keys() == get_peft_model_state_dict(plain).keys()
    assert lora_dropout_mask_for(torch.nn.Linear(2, 2, device="meta")) == "torch"  # not a CPU model


@pytest.mark.parametrize("lora_dropout_mask", ["packed_bits", "torch"])
def test_gradient_checkpointing_recomputes_the_same_dropout_masks(tiny_model_dir, tiny_tokenizer, lora_dropout_mask):
    data = examples(tiny_tokenizer, 8)
    runs = {}
    for checkpointing in (False, True):
        spec = TrainSpec(epochs=1, batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-2, warmup_ratio=0.0,
                         lora_dropout=0.3, lora_dropout_mask=lora_dropout_mask, mixed_precision="no",
                         gradient_checkpointing=checkpointing, seed=3)
        peft_model = prepare_peft_model(load_model(ModelSpec(model=str(tiny_model_dir), device="cpu")), spec)
        result = train_lora(peft_model, data, [], spec, tiny_tokenizer.pad_token_id)
        runs[checkpointing] = ([s.loss for s in result.steps],
                               {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n})
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert max((runs[True][1][n] - runs[False][1][n]).abs().max().item() for n in runs[False][1]) < 1e-5
    # and the dropout is really drawn: without it the same run ends elsewhere
    spec = TrainSpec(epochs=1, batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-2, warmup_ratio=0.0,
                     lora_dropout=0.0, mixed_precision="no", gradient_checkpointing=False, seed=3)
    peft_model = prepare_peft_model(load_model(ModelSpec(model=str(tiny_model_dir), device="cpu")), spec)
    losses = [s.loss for s in train_lora(peft_model, data, [], spec, tiny_tokenizer.pad_token_id).steps]
    assert losses[1:] != pytest.approx(runs[False][0][1:], rel=1e-5)
