"""Honest base predictions and batched = one-at-a-time greedy generation."""


import pytest

from lorasum_assets.ml.generation.generate import generate, generate_with_adapter, has_active_adapter
from lorasum_assets.ml.models.adapter_files import save_adapter
from lorasum_assets.ml.models.loading import ModelSpec, load_model
from lorasum_assets.ml.training.loop import train_lora
from lorasum_assets.ml.training.lora import prepare_peft_model
from lorasum_assets.settings.specs import GenerationSpec, TrainSpec
from lorasum_assets_tests.helpers import examples, prompts


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

    from lorasum_assets.defs.resources import LoraModelResource, ProfileResource

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
    from lorasum_assets.ml.generation.generate import plan_generation_batches

    lengths = [128, 174, 174, 181, 185, 194, 195, 200, 219, 224, 226, 241, 245, 332, 348, 442]
    batches = plan_generation_batches(lengths, batch_size=16, max_padding_share=0.25)
    assert sorted(i for b in batches for i in b) == list(range(16))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) == 1 or width * len(batch) <= 1.25 * sum(lengths[i] for i in batch)
    assert len(batches) > 1
    assert plan_generation_batches(lengths, batch_size=4, max_padding_share=10.0) == [list(range(i, i + 4)) for i in range(0, 16, 4)]


def force_first_token(model, token_id: int) -> None:
    """Make greedy decoding pick ``token_id`` at every step: a zero LM head with a bias on it."""
    import torch

    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[token_id] = 10.0
    model.lm_head = head


@pytest.mark.parametrize("which", [0, 1, 2], ids=["tokenizer eos", "second stop id", "third stop id"])
def test_generation_stops_at_every_stop_id_the_model_lists(tiny_model, tiny_tokenizer, which):
    stops = [tiny_tokenizer.eos_token_id, 5, 7]  # like Llama 3 Instruct's <|end_of_text|>, <|eom_id|>, <|eot_id|>
    tiny_model.generation_config.eos_token_id = stops
    force_first_token(tiny_model, stops[which])
    out = generate(tiny_model, tiny_tokenizer, prompts(tiny_tokenizer)[:1], GenerationSpec(max_new_tokens=6, batch_size=1))[0]
    assert (out.text, out.new_tokens, out.hit_limit) == ("", 0, False)


def test_a_token_that_is_not_a_stop_id_runs_to_the_limit(tiny_model, tiny_tokenizer):
    tiny_model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, 5, 7]
    force_first_token(tiny_model, 9)
    out = generate(tiny_model, tiny_tokenizer, prompts(tiny_tokenizer)[:1], GenerationSpec(max_new_tokens=6, batch_size=1))[0]
    assert out.new_tokens == 6 and out.hit_limit


def test_the_stored_text_is_cut_at_the_first_stop_id(tiny_tokenizer):
    """A model that writes two words, then its second stop id, then more: the text ends before the stop."""
    import torch

    words = tiny_tokenizer("They talk", add_special_tokens=False)["input_ids"]

    class Writes:
        generation_config = type("Config", (), {"eos_token_id": [tiny_tokenizer.eos_token_id, 5]})()

        def parameters(self):
            yield torch.zeros(1)

        def generate(self, input_ids, attention_mask, **kwargs):
            assert kwargs["eos_token_id"] == [tiny_tokenizer.eos_token_id, 5]
            new = torch.tensor([[*words, 5, *words]] * input_ids.shape[0])
            return torch.cat([input_ids, new], dim=1)

    out = generate(Writes(), tiny_tokenizer, [[1, 2, 3]], GenerationSpec(max_new_tokens=20, batch_size=1))[0]
    assert out.text == tiny_tokenizer.decode(words).strip() and out.new_tokens == len(words) and not out.hit_limit


def test_as_loaded_precision_gives_exactly_what_plain_generate_gives(tiny_model_dir, tiny_tokenizer):
    import torch

    from lorasum_assets.ml.generation.generate import collate_left, cut_at_stop, stop_token_ids

    model = load_model(ModelSpec(model=str(tiny_model_dir), device="cpu"))
    test_prompts = prompts(tiny_tokenizer)
    ours = generate(model, tiny_tokenizer, test_prompts, GenerationSpec(max_new_tokens=16, batch_size=16, precision="as_loaded"))
    stops = stop_token_ids(model, tiny_tokenizer)
    input_ids, attention_mask = collate_left(test_prompts, tiny_tokenizer.pad_token_id)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=16, do_sample=False,
                                eos_token_id=stops, pad_token_id=tiny_tokenizer.pad_token_id)
    plain = [tiny_tokenizer.decode(cut_at_stop(row, stops)[0], skip_special_tokens=True).strip()
             for row in output[:, input_ids.shape[1]:].tolist()]
    assert [g.text for g in ours] == plain


@pytest.mark.parametrize("decoder", ["transformers", "lorasum"])
def test_bf16_generation_runs_in_bf16_and_gives_the_model_back_in_fp32(tiny_model_dir, tiny_tokenizer, trained_adapter, monkeypatch, decoder):
    import torch

    from lorasum_assets.ml.generation import decoding
    from lorasum_assets.ml.models import precision

    model = load_model(ModelSpec(model=str(tiny_model_dir), device="cpu"))
    before = {name: (p.data_ptr(), p.dtype) for name, p in model.named_parameters()}
    seen = []
    if decoder == "transformers":
        model.register_forward_pre_hook(lambda module, args: seen.append(module.lm_head.weight.dtype))
    else:
        prepare = decoding.prepare

        def recording_prepare(model, dtype):
            prepared = prepare(model, dtype)
            seen.extend([prepared.lm_head.weight.dtype, prepared.embed.dtype, prepared.norm.weight.dtype])
            return prepared

        monkeypatch.setattr(decoding, "prepare", recording_prepare)
    spec = GenerationSpec(max_new_tokens=8, batch_size=4, precision="bf16", decoder=decoder)
    generate(model, tiny_tokenizer, prompts(tiny_tokenizer), spec)
    generate_with_adapter(model, str(trained_adapter), tiny_tokenizer, prompts(tiny_tokenizer), spec)
    assert seen and set(seen) == {torch.bfloat16}
    assert {name: (p.data_ptr(), p.dtype) for name, p in model.named_parameters()} == before
    assert all(dtype == torch.float32 for _, dtype in before.values())

    # auto: bf16 only for an fp32 model on a CPU with native bf16
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.generation_dtype(model, "auto") == torch.bfloat16
    assert precision.generation_dtype(model, "as_loaded") is None
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.generation_dtype(model, "auto") is None
    assert precision.generation_dtype(model, "bf16") == torch.bfloat16


def test_progress_gives_no_rate_before_the_second_step_and_reports_a_stall_as_one():
    from lorasum_assets.ml.progress import Progress

    now = [0.0]
    progress = Progress(100, "steps", clock=lambda: now[0])
    lines = []
    for step, at in [(1, 0.5), (2, 1.5), (3, 2.5), (4, 3.5), (5, 153.5), (6, 154.5)]:
        now[0] = at
        lines.append(progress.line(step))
    assert lines[0] == "1/100 steps, rate from the next update on"
    assert lines[1] == "2/100 steps, 1.00 steps/s, ~98 s left"
    assert lines[4] == "5/100 steps, 1.00 steps/s, ~95 s left (after a stall of 150 s)"
    assert lines[5] == "6/100 steps, 1.00 steps/s, ~94 s left"


def test_a_process_holds_one_base_model_at_a_time(tiny_model_dir):
    """Training's own copy is loaded only after the shared base is dropped and its memory given back."""
    import gc
    import weakref

    from lorasum_assets.defs.resources import LoraModelResource, ProfileResource

    resource = LoraModelResource(profile=ProfileResource(name="tiny"), model=str(tiny_model_dir), device="cpu")
    shared = weakref.ref(resource.base_model())
    said: list[str] = []
    copy = resource.fresh_model(said.append)
    gc.collect()
    assert shared() is None and copy is not None
    assert said[0] == "released the shared base model before loading another copy"
    assert resource.base_model() is not copy  # asked for again, the shared base loads anew


def test_the_padding_limit_splits_batches_on_a_cpu_only():
    """On a CPU the prefill is compute-bound and padding costs its share; on a GPU a wider batch
    costs little more, so it takes full batches."""
    import torch

    from lorasum_assets.ml.generation.generate import padding_limit

    spec = GenerationSpec(max_padding_share=0.25)
    on_cpu, on_gpu = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta")  # meta: a device that is not the CPU
    assert padding_limit(on_cpu, spec) == 0.25
    assert padding_limit(on_gpu, spec) is None


def test_out_of_memory_back_off_frees_memory_once_the_failed_batch_is_gone(tiny_tokenizer, monkeypatch):
    """empty_cache() inside the except block releases nothing: the exception's traceback still holds
    the failed batch's tensors. The back-off frees after leaving the handler."""
    import weakref

    import torch

    from lorasum_assets.ml.generation import generate as generation

    held: list[weakref.ref] = []

    def decode_batch(batch, heartbeat):
        kv_cache = torch.zeros(len(batch), 1024)  # what a batch holds while it decodes
        held.append(weakref.ref(kv_cache))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return [[5, 6] for _ in batch]

    alive_when_freed = []
    monkeypatch.setattr(generation, "free_accelerator_memory", lambda: alive_when_freed.append(held[-1]() is not None))
    prompts = [[1, 2, 3]] * 4
    spec = GenerationSpec(batch_size=4, max_new_tokens=2)
    rows = generation._run_batches(tiny_tokenizer, prompts, spec, [[0, 1, 2, 3]], [0], decode_batch, None, None)
    assert len(rows) == 4 and all(r.new_tokens == 2 for r in rows)
    assert alive_when_freed == [False]  # one back-off, after the failed batch's tensors were released


def _tiny_resource(tiny_model_dir):
    from lorasum_assets.defs.resources import LoraModelResource, ProfileResource

    return LoraModelResource(profile=ProfileResource(name="tiny"), model=str(tiny_model_dir), device="cpu")


class _Reached(Exception):
    """Raised by a test double at the point whose memory state the test records."""


def _step_context():
    """What these steps read of Dagster's context: a run id and a logger (no instance to start)."""
    from types import SimpleNamespace

    return SimpleNamespace(run=SimpleNamespace(run_id="test-run"), log=SimpleNamespace(info=lambda message: None))


def test_the_accelerate_launcher_releases_the_shared_base_before_its_workers_load_theirs(tiny_model_dir, tmp_path):
    import gc
    import weakref
    from datetime import datetime

    from lorasum_assets.defs.assets.training import TrainingJob, _train_with_accelerate
    from lorasum_assets.settings.specs import LauncherSpec

    resource = _tiny_resource(tiny_model_dir)
    shared = weakref.ref(resource.base_model())
    released_at_launch = []

    class LaunchRecorder:
        def run(self, context, command, env):
            gc.collect()
            released_at_launch.append(shared() is None)
            raise _Reached

    job = TrainingJob(spec=TrainSpec(), train_key="k", data_hash="h", train_examples=[], val_examples=[], checkpoint_dir=tmp_path / "ck",
                      target=tmp_path / "adapter", adapter_id="a", created_at=datetime.now())
    with pytest.raises(_Reached):
        _train_with_accelerate(_step_context(), job, LauncherSpec(launcher="accelerate"), resource, LaunchRecorder())
    assert released_at_launch == [True]


def test_scoring_releases_the_shared_base_before_the_scorer_loads(tiny_model_dir):
    import gc
    import weakref
    from types import SimpleNamespace

    from lorasum_assets.defs.assets.evaluation import ScoredInputs, _score
    from lorasum_assets.settings.specs import ReportSpec

    resource = _tiny_resource(tiny_model_dir)
    shared = weakref.ref(resource.base_model())
    released_at_load = []

    class ScorerRecorder:
        def spec(self):
            return SimpleNamespace(model="recorder")  # only its name is logged

        def scorer(self):
            gc.collect()
            released_at_load.append(shared() is None)
            raise _Reached

    inputs = ScoredInputs("test", [], {}, {}, "h", "a", None, None)
    with pytest.raises(_Reached):
        _score(_step_context(), ScorerRecorder(), inputs, ReportSpec(), resource)
    assert released_at_load == [True]


def test_a_merged_export_frees_its_merged_copy_before_reloading_it(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    import gc

    import torch

    from lorasum_assets.ml.export import merged as export

    spec = ModelSpec(model=str(tiny_model_dir), device="cpu")
    train = TrainSpec(epochs=1, batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-2, warmup_ratio=0.0)
    peft_model = prepare_peft_model(load_model(spec), train)
    train_lora(peft_model, examples(tiny_tokenizer, 4), [], train, tiny_tokenizer.pad_token_id)
    adapter = save_adapter(peft_model, tiny_tokenizer, tmp_path / "adapter")
    del peft_model

    def models_alive() -> int:
        gc.collect()
        # the type name first: isinstance reads __class__, which deprecated torch aliases answer with a warning
        return sum(type(o).__name__.endswith("ForCausalLM") and isinstance(o, torch.nn.Module) for o in gc.get_objects())

    alive_when_freed = []
    monkeypatch.setattr(export, "free_accelerator_memory", lambda: alive_when_freed.append(models_alive()))
    merged = export.merge_adapter(spec, str(adapter), tmp_path / "merged", [[1, 5, 6, 7]])
    assert merged.check.ok
    assert alive_when_freed == [0]  # neither the merged copy nor its base is held when it reloads
