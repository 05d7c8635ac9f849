"""What the history store costs a run: the tiny whole graph on the DuckLake store against the
single-file DuckDB store it replaced, each run in a fresh process and a fresh home, interleaved.

    python -m benchmarks.store_cost --old d01011a --repeats 3

``--old`` is the git revision of the old store (checked out into a temporary worktree and put
first on PYTHONPATH; it needs ``dagster-duckdb``, in the ``bench`` extra). Prints wall time and
the peak RSS of the run's process, median (min-max), and the new/old ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import print_result, run_interleaved, run_whole_graph

ROOT = Path(__file__).resolve().parents[1]


def run_graph(tree: Path, models: Path) -> dict:
    seconds = run_whole_graph(tree, {"LORASUM_PROFILE": "tiny", "PYTHONPATH": str(tree)}, models=models)
    return {"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="git revision whose store to measure against")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both variants, interleaved")
    parser.add_argument("--models", default=str(ROOT / ".lorasum" / "models"), help="model cache shared by every run (tiny model built once)")
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = Path(args.models)
    if args.worker:
        print_result(run_graph(Path(args.tree if args.worker == "old" else ROOT), models))
        return 0

    worktree = Path(tempfile.mkdtemp(prefix="lorasum-old-store-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.old], cwd=ROOT, check=True, capture_output=True)
    try:
        models.mkdir(parents=True, exist_ok=True)
        warm = run_graph(ROOT, models)  # builds the tiny model into the shared cache; not counted
        print(f"warm-up run (builds the tiny model once): {warm['seconds']:.1f} s", file=sys.stderr)
        results = run_interleaved(__spec__.name, [f"--old={args.old}", f"--models={models}", f"--tree={worktree}"], ["old", "new"],
                                  args.repeats, describe=lambda r: f"{r['seconds']:.1f} s, peak RSS {r['peak_mb']:.0f} MB")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(worktree, ignore_errors=True)
    if results is None:
        return 1

    def summary(variant: str, key: str) -> tuple[float, float, float]:
        values = [r[key] for r in results[variant]]
        return statistics.median(values), min(values), max(values)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; tiny profile, whole graph, fresh home per run; "
          f"{args.repeats} repeats interleaved, median (min-max)\n")
    print("| store | seconds | peak RSS of the run (MB) |\n|---|---|---|")
    for variant, label in (("old", f"single-file DuckDB ({args.old})"), ("new", "DuckLake, SQLite catalog")):
        s, m = summary(variant, "seconds"), summary(variant, "peak_mb")
        print(f"| {label} | {s[0]:.1f} ({s[1]:.1f}-{s[2]:.1f}) | {m[0]:,.0f} ({m[1]:,.0f}-{m[2]:,.0f}) |")
    time_ratio = summary("new", "seconds")[0] / summary("old", "seconds")[0]
    memory_ratio = summary("new", "peak_mb")[0] / summary("old", "peak_mb")[0]
    print(f"\nnew / old: time x{time_ratio:.3f}, peak RSS x{memory_ratio:.3f} (target: each at most x1.10)")
    return 0 if time_ratio <= 1.10 and memory_ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
