"""What LoRA dropout costs on CPU: torch's dropout against the other ways of drawing its mask, on
one LoRA input of a SmolLM2-135M micro-batch (2 x 250 tokens x 576).

    python benchmarks/dropout_cost.py [--repeats 3]

Each repeat runs every way 120 times (one micro-batch's forward: 30 layers x q, k, v, o) after 5
warm-up calls; the table gives microseconds per call, median (min-max) over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

P = 0.1
THRESHOLD = round(P * 2**31)


def bulk_bits_dropout(x: torch.Tensor) -> torch.Tensor:
    """Keep each element with probability 1 - P from 31 random bits each, drawn as 64-bit words."""
    words = torch.empty((x.numel() + 1) // 2, dtype=torch.int64).random_()
    keep = (words.view(torch.int32)[: x.numel()] & 0x7FFFFFFF) >= THRESHOLD
    return x * keep.view(x.shape) * (1 / (1 - P))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(2, 250, 576)
    ways = {
        "torch.nn.functional.dropout (what PEFT's LoRA runs)": lambda: torch.nn.functional.dropout(x, P, True),
        "Bernoulli mask only (bernoulli_)": lambda: torch.empty_like(x).bernoulli_(1 - P),
        "uniform floats only (rand_like)": lambda: torch.rand_like(x),
        "31 random bits per element from 64-bit words, masked and scaled": lambda: bulk_bits_dropout(x),
        "a plain copy (x * 1.0), for scale": lambda: x * 1.0,
    }
    timings: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, fn in ways.items():  # interleaved
            for _ in range(5):
                fn()
            started = time.perf_counter()
            for _ in range(120):
                fn()
            timings[name].append((time.perf_counter() - started) / 120 * 1e6)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; x {tuple(x.shape)} fp32, p={P}\n")
    print("| way | µs per call, median (min-max) |\n|---|---|")
    for name, values in timings.items():
        print(f"| {name} | {statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
