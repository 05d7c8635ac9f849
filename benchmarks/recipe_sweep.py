"""The default profile's recipe, chosen by ``lorasum sweep`` on DialogSum dev dialogues (docs/results.md).

    python -m benchmarks.recipe_sweep prepare OUT [--train 200] [--validation 20] [--data ../shared/dialogsum]
    python -m benchmarks.recipe_sweep test [--train 200] [--data ../shared/dialogsum]

writes a DialogSum folder for ``lorasum sweep GRID --data OUT`` from the dev file alone, so that no
test dialogue is seen while choosing: ``dialogsum.train.jsonl`` (the first ``--train`` dev
dialogues: what the points train on), ``dialogsum.validation.jsonl`` (the next ``--validation``:
the validation loss while training) and ``dialogsum.test.jsonl`` (every other dev dialogue: what
the points are scored and ranked on; named test because the pipeline scores its test split). The
folder holds DialogSum's text, so keep it outside the repository.

``test`` measures once on the test split what the sweep chose: the default profile's recipe before
the sweep (``OLD_RECIPE``) and now, each trained on the same first ``--train`` dev dialogues through
the project's own training and generation with the profile's settings, both scored on every test
dialogue against all three references (best per example) and against ``summary1``, with paired
bootstrap CIs. Writes benchmarks/results/recipe_test.json. Both commands exit 2 without the
DialogSum files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, add_data_arguments, dialogsum_splits, print_host, training_examples
from lorasum_assets.settings.specs import ALL_LINEAR

PROFILE = "smollm2-135m"
# The profile's LoRA settings before the sweep: the notebook's targets and rank, lr and epochs picked for speed.
OLD_RECIPE = {"learning_rate": 1e-3, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj"), "lora_r": 16, "lora_alpha": 32, "epochs": 2}
BART_LARGE = {"rouge1": 45.95, "rouge2": 21.36, "rougeL": 38.72}  # published, against summary1


def prepare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe_sweep prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write (outside the repository)")
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--validation", type=int, default=20)
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    dev_file = Path(args.data) / "dialogsum.dev.jsonl"
    if not dev_file.exists():
        print(f"no DialogSum dev file at {dev_file}; nothing measured", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    if out.is_relative_to(ROOT):
        raise SystemExit(f"{out} is inside the repository; DialogSum (CC BY-NC-SA) must stay outside it")
    rows = [json.loads(line) for line in dev_file.read_text("utf-8").splitlines() if line.strip()]
    cut = args.train + args.validation
    if len(rows) <= cut:
        raise SystemExit(f"{dev_file} has {len(rows)} dialogues; --train + --validation = {cut} leaves none to rank on")
    parts = {"train": rows[: args.train], "validation": rows[args.train : cut], "test": rows[cut:]}
    out.mkdir(parents=True, exist_ok=True)
    for split, part in parts.items():
        (out / f"dialogsum.{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part), "utf-8")
        print(f"{out / f'dialogsum.{split}.jsonl'}: dev dialogues {rows.index(part[0]) + 1}-{rows.index(part[0]) + len(part)} "
              f"({len(part)}; {part[0]['fname']} .. {part[-1]['fname']})")
    return 0


def measure_on_test(argv: list[str]) -> int:
    from lorasum_assets.ml.data.prompts import encode_prompt
    from lorasum_assets.ml.evaluation.bertscore import BertScoreModel, resolved_scorer_spec
    from lorasum_assets.ml.evaluation.scoring import metric_value, score_predictions
    from lorasum_assets.ml.generation.generate import generate_with_adapter
    from lorasum_assets.ml.models.loading import ModelSpec, load_model, load_tokenizer
    from lorasum_assets.ml.training.records import TrainingRequest
    from lorasum_assets.ml.training.run import train_adapter
    from lorasum_assets.settings.profiles import get_profile
    from lorasum_assets.settings.specs import with_overrides

    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe_sweep test", description="the old and the new default recipe on the test split")
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--validation", type=int, default=20)
    parser.add_argument("--test-every", type=int, default=1, help="score every K-th test dialogue (1: all of them)")
    parser.add_argument("--adapters", nargs=2, metavar=("OLD", "NEW"),
                        help="adapter folders already trained with the old and the new recipe on the same dev dialogues "
                             "(such as the sweep's points): scored as they are, not trained again")
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    if not Path(args.data, "dialogsum.test.jsonl").exists():
        print(f"no DialogSum files in {args.data}: nothing measured", file=sys.stderr)
        return 2
    profile = get_profile(PROFILE)
    recipes = {"old": with_overrides(profile.training, OLD_RECIPE), "new": profile.training}
    if recipes["old"] == recipes["new"]:
        raise SystemExit(f"the {PROFILE} profile still has the old recipe: nothing to compare")
    dev, test = dialogsum_splits(args.data)
    test = test[:: args.test_every]
    train_rows, val_rows = dev[: args.train], dev[args.train : args.train + args.validation]
    spec = ModelSpec(model=profile.model.model, cache_dir=args.cache)
    tokenizer = load_tokenizer(spec)
    boundary = profile.model.prompt_boundary

    def encode(rows):
        return training_examples(tokenizer, rows, profile.tokenize.max_length, boundary=boundary)

    train_examples, val_examples = encode(train_rows), encode(val_rows)
    prompts = [encode_prompt(tokenizer, d.dialogue, boundary=boundary)[0] for d in test]
    print_host()
    texts, timings, runs = {}, {}, {}
    for index, (label, recipe) in enumerate(recipes.items()):
        if args.adapters:
            adapter_dir = Path(args.adapters[index])
            check_adapter_recipe(adapter_dir, recipe)
            trained = f"trained before: {adapter_dir}"
            runs[label] = {"adapter": str(adapter_dir)}
            train_s = None
        else:
            adapter_dir = Path(args.cache).parent / f"recipe-test-{label}"
            started = time.perf_counter()
            result = train_adapter(TrainingRequest(spec=recipe, train_examples=train_examples, val_examples=val_examples, adapter_dir=adapter_dir),
                                   load=lambda: (tokenizer, load_model(spec)))
            train_s = time.perf_counter() - started
            trained = f"trained {train_s:.0f} s ({result.total_steps} steps, val loss {result.val_losses[-1]:.4f})"
            runs[label] = {"steps": result.total_steps, "val_loss": result.val_losses[-1], "real_tokens": result.real_tokens}
        started = time.perf_counter()
        generations = generate_with_adapter(load_model(spec), str(adapter_dir), tokenizer, prompts, profile.generation)
        timings[label] = {"train_s": train_s, "generate_s": time.perf_counter() - started}
        texts[label] = [g.text for g in generations]
        print(f"{label}: {recipe_line(recipe)}; {trained}; summarized {len(test)} test dialogues in "
              f"{timings[label]['generate_s']:.0f} s", flush=True)

    scorer = BertScoreModel(resolved_scorer_spec(profile.scorer))
    report = score_predictions(scorer, {"base": texts["old"], "tuned": texts["new"]}, [d.references for d in test], n_resamples=1000, seed=0)
    print(f"\n{len(test)} test dialogues; trained on dev dialogues 1-{args.train}; scorer {scorer.hash}; "
          f"{platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| references | metric | old default (95% CI) | new default (95% CI) | new − old (paired 95% CI) | BART-large |")
    print("|---|---|---|---|---|---|")
    rows = []
    for ref_set, label in (("all", "best of 3"), ("first", "summary1")):
        for metric in ("bertscore_f1", "rouge1", "rouge2", "rougeL"):
            old, new, delta = (metric_value(report, m, metric, ref_set) for m in ("base", "tuned", "delta"))
            scale = 1 if metric.startswith("bertscore") else 100
            bart = f"{BART_LARGE[metric]:.2f}" if ref_set == "first" and metric in BART_LARGE else ""
            print(f"| {label} | {metric} | {old['value'] * scale:.2f} [{old['ci_low'] * scale:.2f}, {old['ci_high'] * scale:.2f}] "
                  f"| {new['value'] * scale:.2f} [{new['ci_low'] * scale:.2f}, {new['ci_high'] * scale:.2f}] "
                  f"| {delta['value'] * scale:+.2f} [{delta['ci_low'] * scale:+.2f}, {delta['ci_high'] * scale:+.2f}] | {bart} |"
                  if scale == 100 else
                  f"| {label} | {metric} | {old['value']:.4f} [{old['ci_low']:.4f}, {old['ci_high']:.4f}] "
                  f"| {new['value']:.4f} [{new['ci_low']:.4f}, {new['ci_high']:.4f}] "
                  f"| {delta['value']:+.4f} [{delta['ci_low']:+.4f}, {delta['ci_high']:+.4f}] | |")
            rows.append({"references": ref_set, "metric": metric, "old": old, "new": new, "new_minus_old": delta})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recipe_test.json").write_text(json.dumps({
        "args": vars(args), "recipes": {k: recipe_line(v) for k, v in recipes.items()}, "timings": timings, "runs": runs,
        "rows": rows, "empty": report.empty_predictions}, indent=2))
    return 0


def check_adapter_recipe(adapter_dir: Path, recipe) -> None:
    """An adapter given with --adapters must have the recipe's rank, alpha and targets (its config
    records those; the learning rate and epochs are in the registry, which the sweep's table shows)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    targets = {t.split(".")[-1] for t in config["target_modules"]}
    expected = ({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} if recipe.target_modules == (ALL_LINEAR,)
                else set(recipe.target_modules))
    if (config["r"], config["lora_alpha"], targets) != (recipe.lora_r, recipe.lora_alpha, expected):
        raise SystemExit(f"{adapter_dir}: r {config['r']}, alpha {config['lora_alpha']}, targets {sorted(targets)}; "
                         f"the recipe has {recipe_line(recipe)}")


def recipe_line(recipe) -> str:
    return (f"lr {recipe.learning_rate:g}, targets {','.join(recipe.target_modules)}, r {recipe.lora_r}, "
            f"alpha {recipe.lora_alpha}, {recipe.epochs} epochs")


if __name__ == "__main__":
    from lorasum_assets.runtime.quiet import quiet_known_noise

    quiet_known_noise()
    commands = {"prepare": prepare, "test": measure_on_test}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(f"usage: python -m benchmarks.recipe_sweep {{{','.join(commands)}}} ...")
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
