"""Training: only LoRA weights change, it learns, 4-bit works on CPU, adapters reload, resume works."""

import json
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorasum_assets.ml.data.prompts import encode_example
from lorasum_assets.ml.models.adapter_files import save_adapter
from lorasum_assets.ml.models.loading import ModelSpec, load_model
from lorasum_assets.ml.training.batching import TrainExample, collate_right, plan_batches, steps_per_epoch
from lorasum_assets.ml.training.loop import TrainSpec, train_lora
from lorasum_assets.ml.training.lora import prepare_peft_model
from lorasum_assets_tests.helpers import examples

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_all_linear_adapts_every_projection_but_the_head_and_the_adapter_lists_them(tiny_model, tiny_tokenizer, tmp_path):
    spec = TrainSpec(epochs=1, batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-2, warmup_ratio=0.0,
                     target_modules=["all-linear"], gradient_checkpointing=False)
    peft_model = prepare_peft_model(tiny_model, spec)
    adapted = {name.split(".")[-2] for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}
    assert adapted == set(ALL_LINEAR)
    assert sum(name.endswith(".lora_A") for name, _ in peft_model.named_modules()) == 2 * len(ALL_LINEAR)
    train_lora(peft_model, examples(tiny_tokenizer, 4), [], spec, tiny_tokenizer.pad_token_id)
    save_adapter(peft_model, tiny_tokenizer, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {target.split(".")[-1] for target in saved["target_modules"]} == set(ALL_LINEAR)  # PEFT may save full paths


@pytest.mark.parametrize("targets,message", [
    ([], "name one module or more"),
    (["all-linear", "q_proj"], "give it alone"),
])
def test_target_modules_are_checked(targets, message):
    with pytest.raises(ValueError, match=message):
        TrainSpec(target_modules=targets)


def test_only_lora_weights_change_and_they_do(tiny_model, tiny_tokenizer):
    before = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    spec = TrainSpec(epochs=1, batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, warmup_ratio=0.0, gradient_checkpointing=True)
    peft_model = prepare_peft_model(tiny_model, spec)
    train_lora(peft_model, examples(tiny_tokenizer, 8), [], spec, tiny_tokenizer.pad_token_id)
    changed_lora, base_names = 0, 0
    for name, value in peft_model.named_parameters():
        if "lora_" in name:
            if "lora_B" in name:
                changed_lora += int(not torch.all(value == 0))
            continue
        base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(value.detach(), before[base_name]), f"{base_name} changed"
        base_names += 1
    assert base_names == len(before)
    assert changed_lora == 8  # q/k/v/o in 2 layers


def test_overfitting_eight_examples_halves_the_loss(tiny_model, tiny_tokenizer):
    spec = TrainSpec(
        epochs=40, batch_size=8, gradient_accumulation_steps=1, learning_rate=1e-2, warmup_ratio=0.0,
        lora_r=16, lora_alpha=32, lora_dropout=0.0, gradient_checkpointing=False,
    )
    data = examples(tiny_tokenizer, 8)
    peft_model = prepare_peft_model(tiny_model, spec)
    result = train_lora(peft_model, data, data, spec, tiny_tokenizer.pad_token_id)
    assert result.total_steps == 40
    assert result.steps[-1].loss <= 0.5 * result.steps[0].loss, (result.steps[0].loss, result.steps[-1].loss)
    assert result.val_losses[-1] < result.val_losses[0]


def test_nf4_trains_and_saves_on_cpu(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = load_model(ModelSpec(model=str(tiny_model_dir), quantization="nf4", device="cpu"))
    assert model.is_loaded_in_4bit
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    spec = TrainSpec(epochs=1, batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-3, warmup_ratio=0.0)
    peft_model = prepare_peft_model(model, spec)
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            assert "lora_" in name and param.dtype == torch.float32
    result = train_lora(peft_model, examples(tiny_tokenizer, 8), examples(tiny_tokenizer, 2, "validation"), spec, tiny_tokenizer.pad_token_id)
    assert result.total_steps == 2 and all(s.grad_norm > 0 for s in result.steps)
    target = save_adapter(peft_model, tiny_tokenizer, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in target.iterdir()}


def test_reloaded_adapter_reproduces_logits(tiny_model_dir, tiny_tokenizer, tmp_path):
    from peft import PeftModel

    spec = TrainSpec(epochs=1, batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-2, warmup_ratio=0.0, lora_dropout=0.0)
    peft_model = prepare_peft_model(load_model(ModelSpec(model=str(tiny_model_dir), device="cpu")), spec)
    data = examples(tiny_tokenizer, 8)
    train_lora(peft_model, data, [], spec, tiny_tokenizer.pad_token_id)
    save_adapter(peft_model, tiny_tokenizer, tmp_path / "adapter")
    batch = collate_right(data[:4], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        trained = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        fresh_base = load_model(ModelSpec(model=str(tiny_model_dir), device="cpu"))
        fresh_base.set_attn_implementation(peft_model.config._attn_implementation)  # training picks eager on CPU
        reloaded_model = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter")
        reloaded = reloaded_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        plain = load_model(ModelSpec(model=str(tiny_model_dir), device="cpu"))(input_ids=batch["input_ids"]).logits
    assert torch.allclose(trained, reloaded, atol=1e-5)
    assert not torch.allclose(trained, plain, atol=1e-3)


class Crash(RuntimeError):
    pass


def test_training_stopped_by_an_error_resumes_to_the_planned_step_count(tiny_model_dir, tiny_tokenizer, tmp_path):
    spec = TrainSpec(epochs=3, batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-3, checkpoint_steps=2, lora_dropout=0.0, gradient_checkpointing=False)
    data = examples(tiny_tokenizer, 10)
    planned = steps_per_epoch(len(data), spec) * spec.epochs
    logged: dict[int, int] = {}

    def crash_at_step_5(log):
        logged[log.step] = logged.get(log.step, 0) + 1
        if log.step == 5:
            raise Crash("killed")

    model = lambda: prepare_peft_model(load_model(ModelSpec(model=str(tiny_model_dir), device="cpu")), spec)  # noqa: E731
    with pytest.raises(Crash):
        train_lora(model(), data, [], spec, tiny_tokenizer.pad_token_id, checkpoint_dir=tmp_path / "ckpt", on_step=crash_at_step_5)
    resumed = train_lora(model(), data, [], spec, tiny_tokenizer.pad_token_id, checkpoint_dir=tmp_path / "ckpt",
                         on_step=lambda log: logged.__setitem__(log.step, logged.get(log.step, 0) + 1))
    # the error came after step 5 was made: the checkpoint on the way out holds it (kill -9, which
    # runs no handler, resumes from the last periodic checkpoint: test_training_asset.py)
    assert resumed.resumed_from_step == 5
    assert resumed.total_steps == planned == 9
    assert [s.step for s in resumed.steps] == list(range(1, planned + 1))
    # A straight run gives the same final loss: the resume restored optimizer, schedule and data order.
    straight = train_lora(model(), data, [], spec, tiny_tokenizer.pad_token_id)
    assert resumed.steps[-1].loss == pytest.approx(straight.steps[-1].loss, rel=1e-4)
    assert logged[5] == 1 and logged[6] == 1  # no step made twice


def test_an_interrupted_training_checkpoints_its_last_whole_step_and_resumes_there(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Terminate in the UI interrupts the step (Dagster raises in the step's thread): the steps made
    since the last periodic checkpoint are kept, and the next run resumes after them."""
    from lorasum_assets.ml.training.checkpoints import complete_checkpoints

    spec = TrainSpec(epochs=3, batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-3, checkpoint_steps=10, lora_dropout=0.0,
                     gradient_checkpointing=False)
    data = examples(tiny_tokenizer, 10)
    model = lambda: prepare_peft_model(load_model(ModelSpec(model=str(tiny_model_dir), device="cpu")), spec)  # noqa: E731
    logged = {"step": 0}

    def interrupt_after_step_2(module, args):
        if logged["step"] >= 2:
            raise KeyboardInterrupt  # in step 3's forward pass; checkpoints come every 10 steps and at epoch ends (step 3)

    interrupted = model()
    first_layer = next(m for m in interrupted.modules() if type(m).__name__ == "LlamaDecoderLayer")
    first_layer.register_forward_pre_hook(interrupt_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_lora(interrupted, data, [], spec, tiny_tokenizer.pad_token_id, checkpoint_dir=tmp_path / "ckpt",
                   on_step=lambda log: logged.__setitem__("step", log.step))
    assert [p.name for p in complete_checkpoints(tmp_path / "ckpt")] == ["step-2"]
    resumed = train_lora(model(), data, [], spec, tiny_tokenizer.pad_token_id, checkpoint_dir=tmp_path / "ckpt")
    assert resumed.resumed_from_step == 2
    assert [s.step for s in resumed.steps] == list(range(1, 10))
    straight = train_lora(model(), data, [], spec, tiny_tokenizer.pad_token_id)
    assert resumed.steps[-1].loss == pytest.approx(straight.steps[-1].loss, rel=1e-4)


def padding_efficiency(lengths, batches):
    return sum(lengths) / sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_length_grouped_batches_cover_every_example_once_and_pad_little():
    import random

    lengths = random.Random(1).choices(range(60, 500), k=44)
    batches = plan_batches(lengths, batch_size=2, seed=0, epoch=0, group_by_length=True)
    assert sorted(i for b in batches for i in b) == list(range(44))
    assert plan_batches(lengths, 2, 0, 0, True) == batches  # deterministic: a resumed run gets the same batches
    ungrouped = plan_batches(lengths, 2, 0, 0, False)
    assert padding_efficiency(lengths, batches) > padding_efficiency(lengths, ungrouped) + 0.1


def test_each_epoch_has_different_length_grouped_micro_batches():
    import random

    lengths = random.Random(1).choices(range(60, 500), k=44)  # fewer than 100 examples, as in the sample
    epochs = [{frozenset(b) for b in plan_batches(lengths, 2, seed=42, epoch=e, group_by_length=True)} for e in range(3)]
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


def test_adapter_write_is_atomic_and_reports_an_unwritable_place(tiny_model, tiny_tokenizer, tmp_path):
    from lorasum_assets.ml.models.adapter_files import AdapterWriteError

    peft_model = prepare_peft_model(tiny_model, TrainSpec(epochs=1))
    (tmp_path / "blocked").write_text("a file where the adapters folder should be")
    with pytest.raises(AdapterWriteError, match="cannot write the adapter to"):
        save_adapter(peft_model, tiny_tokenizer, tmp_path / "blocked" / "adapter")
    target = save_adapter(peft_model, tiny_tokenizer, tmp_path / "ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "ok"]  # no staging left behind
    assert Path(target, "adapter_model.safetensors").stat().st_size > 0


def test_cuda_out_of_memory_says_which_knobs_to_turn(tiny_model, tiny_tokenizer, monkeypatch):
    import lorasum_assets.ml.training.loss as loss_module

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loss_module, "token_loss_sum", out_of_memory)
    spec = TrainSpec(epochs=1, batch_size=4, gradient_accumulation_steps=1)
    with pytest.raises(RuntimeError, match=r"lower batch_size \(now 4\).*max_length \(now \d+\)"):
        train_lora(prepare_peft_model(tiny_model, spec), examples(tiny_tokenizer, 4), [], spec, tiny_tokenizer.pad_token_id)


def test_a_prequantized_checkpoint_loads_without_quantizing_twice(tiny_model_dir, tmp_path, monkeypatch):
    """Like unsloth/Llama-3.2-3B-Instruct-bnb-4bit: the folder carries its own quantization config."""
    import transformers

    quantized = load_model(ModelSpec(model=str(tiny_model_dir), quantization="nf4", device="cpu"))
    quantized.save_pretrained(tmp_path / "prequantized")
    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return original(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model = load_model(ModelSpec(model=str(tmp_path / "prequantized"), quantization="nf4", device="cpu"))
    assert "quantization_config" not in seen
    assert model.is_loaded_in_4bit
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_precision_follows_the_hardware():
    import torch

    from lorasum_assets.ml.models.loading import pick_dtype

    assert pick_dtype(ModelSpec(model="x"), "cpu") == torch.float32
    assert pick_dtype(ModelSpec(model="x", compute_dtype="bfloat16"), "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="quantization"):
        ModelSpec(model="x", quantization="int3")


def test_completion_only_logits_give_the_same_loss(tiny_model, tiny_tokenizer):
    from lorasum_assets.ml.training.loss import token_loss_sum

    peft_model = prepare_peft_model(tiny_model, TrainSpec(lora_dropout=0.0, gradient_checkpointing=False))
    batch = collate_right(examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    full, n_full = token_loss_sum(peft_model, dict(batch), None, completion_only_logits=False)
    only, n_only = token_loss_sum(peft_model, dict(batch), None, completion_only_logits=True)
    assert n_full == n_only == int((batch["labels"][:, 1:] != -100).sum())
    assert only.detach().item() == pytest.approx(full.detach().item(), rel=1e-5)
    only.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_bf16_autocast_on_cpu_keeps_the_loss(tiny_model, tiny_tokenizer):
    from lorasum_assets.ml.training.loss import token_loss_sum

    peft_model = prepare_peft_model(tiny_model, TrainSpec(lora_dropout=0.0, gradient_checkpointing=False))
    batch = collate_right(examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    fp32, _ = token_loss_sum(peft_model, dict(batch), None)
    bf16, _ = token_loss_sum(peft_model, dict(batch), torch.bfloat16)
    assert bf16.detach().item() == pytest.approx(fp32.detach().item(), rel=1e-2)


def test_packing_gives_the_same_loss_as_padding(tiny_model, tiny_tokenizer):
    """Position ids reset per example and no cross-example attention: packed == padded loss."""
    from lorasum_assets.ml.training.batching import collate_packed
    from lorasum_assets.ml.training.loss import token_loss_sum

    peft_model = prepare_peft_model(tiny_model, TrainSpec(lora_dropout=0.0, gradient_checkpointing=False))
    data = examples(tiny_tokenizer, 4)
    padded, n_padded = token_loss_sum(peft_model, collate_right(data, tiny_tokenizer.pad_token_id), None)
    packed_batch = collate_packed(data, tiny_tokenizer.pad_token_id)
    assert packed_batch["input_ids"].shape == (1, sum(len(e.input_ids) for e in data))
    packed, n_packed = token_loss_sum(peft_model, packed_batch, None)
    assert n_packed == n_padded
    assert packed.detach().item() == pytest.approx(padded.detach().item(), rel=1e-4)
    # without the position-id resets the examples would see each other, and the loss would differ
    leaky = dict(packed_batch, position_ids=torch.arange(packed_batch["input_ids"].shape[1]).unsqueeze(0))
    assert token_loss_sum(peft_model, leaky, None)[0].detach().item() != pytest.approx(padded.detach().item(), rel=1e-4)


@pytest.mark.slow  # compile_layers is opt-in, and compiling takes 20 s of the default suite's 6 minutes
def test_compiled_layers_train_like_eager_ones_and_save_the_same_keys(tiny_model_dir, tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file

    data = examples(tiny_tokenizer, 8)
    losses, saved = {}, {}
    for compiled in (False, True):
        spec = TrainSpec(epochs=1, batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-2, lora_dropout=0.0,
                         gradient_checkpointing=False, mixed_precision="no", compile_layers=compiled)
        peft_model = prepare_peft_model(load_model(ModelSpec(model=str(tiny_model_dir), device="cpu")), spec)
        result = train_lora(peft_model, data, [], spec, tiny_tokenizer.pad_token_id)
        losses[compiled] = [s.loss for s in result.steps]
        save_adapter(peft_model, tiny_tokenizer, tmp_path / str(compiled))
        saved[compiled] = load_file(str(tmp_path / str(compiled) / "adapter_model.safetensors"))
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert saved[True].keys() == saved[False].keys()
    assert max((saved[True][k] - saved[False][k]).abs().max().item() for k in saved[False]) < 1e-4


def test_training_in_bf16_leaves_the_base_weights_as_they_were(tiny_model_dir, tiny_tokenizer):
    spec = TrainSpec(epochs=1, batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-2, mixed_precision="bf16")
    peft_model = prepare_peft_model(load_model(ModelSpec(model=str(tiny_model_dir), device="cpu")), spec)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    seen_dtypes = set()
    base = peft_model.get_base_model()

    def record_dtypes(log):
        seen_dtypes.add(("linear", base.model.layers[0].mlp.up_proj.weight.dtype))
        seen_dtypes.add(("embedding", base.model.embed_tokens.weight.dtype))

    train_lora(peft_model, examples(tiny_tokenizer, 4), [], spec, tiny_tokenizer.pad_token_id, on_step=record_dtypes)
    # Linear weights stored once in the autocast dtype while training; embeddings stay fp32
    assert seen_dtypes == {("linear", torch.bfloat16), ("embedding", torch.float32)}
    after = dict(peft_model.named_parameters())
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], t) for n, t in before.items())
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)


def test_bf16_training_stores_only_linear_weights_in_bf16_and_matches_autocast(tiny_model, tiny_tokenizer):
    from lorasum_assets.ml.models.precision import frozen_weights_in
    from lorasum_assets.ml.training.loss import token_loss_sum

    spec = TrainSpec(lora_dropout=0.0, gradient_checkpointing=False)
    peft_model = prepare_peft_model(tiny_model, spec)
    batch = collate_right(examples(tiny_tokenizer, 4), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        reference, _ = token_loss_sum(peft_model, dict(batch), torch.bfloat16)  # autocast casts every step
    base = peft_model.get_base_model()
    with frozen_weights_in(peft_model, torch.bfloat16) as stored, torch.no_grad():
        assert stored > 0
        assert base.model.embed_tokens.weight.dtype == torch.float32  # the residual stream starts in fp32
        assert all(layer.input_layernorm.weight.dtype == torch.float32 for layer in base.model.layers)
        assert base.model.norm.weight.dtype == torch.float32
        assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
        assert base.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        assert base.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32  # adapters stay fp32
        cast_once, _ = token_loss_sum(peft_model, dict(batch), torch.bfloat16)
    assert cast_once.item() == reference.item()  # the same numbers as autocast alone
    assert all(p.dtype == torch.float32 for p in peft_model.parameters())


def test_cpu_training_uses_eager_attention_up_to_512_tokens_and_sdpa_above(tiny_model, tiny_tokenizer):
    from lorasum_assets.ml.training.lora import CPU_EAGER_MAX_WIDTH, training_attention

    text = resources.files("lorasum_assets").joinpath("sample_data/dialogues.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    joined = "\n".join(r["dialogue"] for r in rows[:12])
    long_examples = [encode_example(tiny_tokenizer, joined, rows[i]["summary"], 700) for i in range(2)]
    short = examples(tiny_tokenizer, 2)
    train = short + [TrainExample(e.input_ids, e.labels) for e in long_examples]
    assert max(len(e.input_ids) for e in short) <= CPU_EAGER_MAX_WIDTH < min(len(e.input_ids) for e in long_examples)

    spec = TrainSpec(epochs=1, batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-3, warmup_ratio=0.0,
                     gradient_checkpointing=False, lora_dropout=0.0)
    peft_model = prepare_peft_model(tiny_model, spec)
    seen = []
    decoder = peft_model.get_base_model().model
    decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"].shape[1], module.config._attn_implementation)), with_kwargs=True
    )
    train_lora(peft_model, train, [], spec, tiny_tokenizer.pad_token_id)
    assert sorted(seen) == sorted((len(e.input_ids), "sdpa" if len(e.input_ids) > 512 else "eager") for e in train)
    assert training_attention(peft_model, "eager", 700) == "eager" and training_attention(peft_model, "sdpa", 100) == "sdpa"

    # both kernels give the same loss on a wide batch
    from lorasum_assets.ml.training.lora import use_attention
    from lorasum_assets.ml.training.loss import token_loss_sum

    batch = collate_right(train[2:], tiny_tokenizer.pad_token_id)
    losses = {}
    with torch.no_grad():
        for kernel in ("eager", "sdpa"):
            use_attention(peft_model, kernel)
            losses[kernel] = float(token_loss_sum(peft_model, dict(batch))[0])
    assert abs(losses["eager"] - losses["sdpa"]) <= 1e-4 * abs(losses["eager"])


def test_an_nf4_adapter_merges_into_the_dequantized_base(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorasum_assets.ml.export.merged import merge_adapter

    spec = ModelSpec(model=str(tiny_model_dir), quantization="nf4", device="cpu")
    train = TrainSpec(epochs=1, batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-3, warmup_ratio=0.0, lora_dropout=0.0)
    peft_model = prepare_peft_model(load_model(spec), train)
    train_lora(peft_model, examples(tiny_tokenizer, 8), examples(tiny_tokenizer, 2, "validation"), train, tiny_tokenizer.pad_token_id)
    adapter = save_adapter(peft_model, tiny_tokenizer, tmp_path / "adapter")
    prompts = [e.input_ids[:24] for e in examples(tiny_tokenizer, 4, "validation")]
    # The tiny model's init (0.2, ten times Llama's) puts the 4-bit kernels and the dequantized
    # weights a few percent of the largest logit apart; the stand-in of test_recipe.py, at Llama's
    # own scale, is checked at the default tolerance.
    merged = merge_adapter(spec, str(adapter), tmp_path / "merged", prompts, tolerance=0.05)
    # an fp32 checkpoint quantized on load computes in fp32 on a CPU, and so is exported
    assert merged.dequantized and merged.dtype == "float32"
    print(merged.check.describe())
    assert merged.check.ok and merged.check.prompts == 4
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert getattr(plain.config, "quantization_config", None) is None
    assert not any(type(m).__name__ == "Linear4bit" for m in plain.modules())
    assert plain.dtype == torch.float32


@pytest.mark.parametrize("gpu, native_bf16, expected", [("A100", True, torch.bfloat16), ("T4", False, torch.float16)])
def test_bf16_only_where_the_gpu_has_it_in_hardware(monkeypatch, gpu, native_bf16, expected):
    """torch.cuda.is_bf16_supported() says yes on a T4 by default (it counts emulation): the
    automatic choice asks without emulation, so a T4 or V100 gets fp16 with the grad scaler."""
    from lorasum_assets.ml.models.loading import pick_dtype
    from lorasum_assets.ml.models.precision import training_autocast_dtype

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert pick_dtype(ModelSpec(model="x"), "cuda") == expected, gpu

    class OnCuda:  # all training_autocast_dtype reads of a model: where its parameters are
        def parameters(self):
            yield SimpleNamespace(device=SimpleNamespace(type="cuda"))

    assert training_autocast_dtype(OnCuda(), "auto") == expected, gpu


def test_an_fp16_step_whose_gradients_overflow_is_skipped_and_holds_the_schedule(tiny_model, tiny_tokenizer):
    """fp16 with the grad scaler (on CPU as on a GPU): an overflow forced into step 3's gradients
    makes the scaler skip that update; the step is recorded as skipped with no grad norm, the
    learning rate does not move on, and training finishes."""
    spec = TrainSpec(epochs=1, batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-3, warmup_ratio=0.0,
                     lora_dropout=0.0, mixed_precision="fp16", lr_scheduler="cosine")
    peft_model = prepare_peft_model(tiny_model, spec)
    backward_passes = 0

    def overflow_on_the_third_backward(grad):
        nonlocal backward_passes
        backward_passes += 1
        return grad * float("inf") if backward_passes == 3 else grad

    lora_b = next(p for n, p in peft_model.named_parameters() if "lora_B" in n)
    lora_b.register_hook(overflow_on_the_third_backward)
    result = train_lora(peft_model, examples(tiny_tokenizer, 6), [], spec, tiny_tokenizer.pad_token_id)
    rows = [(log.step, log.skipped, log.grad_norm is None, f"{log.learning_rate:.3e}") for log in result.steps]
    print(f"precision {result.precision}; (step, skipped, no grad norm, lr): {rows}")
    assert result.precision == "fp16"
    assert result.grad_scale == 2.0**16 / 2  # the scaler's initial scale, backed off once for the one overflow
    assert [log.step for log in result.steps] == [1, 2, 3, 4, 5, 6] and result.skipped_steps == [3]
    assert result.steps[2].grad_norm is None and all(log.grad_norm is not None for log in result.steps if not log.skipped)
    lrs = [log.learning_rate for log in result.steps]
    assert lrs[3] == lrs[2] != lrs[1]  # step 4 steps with the rate step 3 could not use
    assert lrs[4] < lrs[3] and all(torch.isfinite(p).all() for p in peft_model.parameters() if p.requires_grad)
