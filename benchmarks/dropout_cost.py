"""What LoRA dropout costs on CPU: torch's dropout against the other ways of drawing its mask, on
one LoRA input of a SmolLM2-135M micro-batch (2 x 250 tokens x 576), forward and backward.

    python benchmarks/dropout_cost.py [--repeats 3]

Each repeat runs every way 120 times (one micro-batch's forward: 30 layers x q, k, v, o) after 5
warm-up calls, each a forward and a backward pass; the table gives microseconds per call, median
(min-max) over the repeats. The ways run interleaved in one process: this is a per-call cost table,
the training benchmarks (peer.py, lora_dropout_check.py) measure what it does to a whole run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorasum_assets.ml.lora_dropout import PackedBitsDropout  # noqa: E402

P = 0.1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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
        print(f"| {name} | {statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
