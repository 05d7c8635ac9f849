"""What loading the code location costs: ``import lorasum_assets.definitions`` in a fresh process,
wall time and peak resident memory, for the working tree and for earlier commits, interleaved.

    python -m benchmarks.import_cost [--before REV ...] [--repeats 5]

Every Dagster process that loads the code location pays this: the webserver's and the daemon's
code servers, each run worker and each step subprocess. Each commit is checked out into a
temporary worktree; its package is put first on ``sys.path``, ahead of the editable install.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, spread

ML_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "bert_score")
PROBE = (
    "import sys, lorasum_assets.definitions, lorasum_assets; "
    f"print(lorasum_assets.__file__, ','.join(sorted(m for m in sys.modules if m in {ML_LIBRARIES!r})) or '-')"
)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure(tree: Path) -> dict:
    """One fresh interpreter importing the definitions from ``tree``: seconds, peak RSS in MB, the
    package file it imported (to prove which tree ran) and the ML libraries it pulled in."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", PROBE], cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    out, err = process.stdout.read(), process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"importing the definitions from {tree} failed:\n{err[-3000:]}")
    package_file, libraries = out.split()
    return {"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024, "package": package_file, "ml_libraries": libraries}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", nargs="*", default=["HEAD"], help="commits to compare with the working tree")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"host: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"working tree": ROOT}
        for rev in args.before:
            folder = Path(scratch) / rev.replace("/", "_")
            subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(folder), rev], cwd=ROOT, check=True)
            trees[rev] = folder
        try:
            results = {name: [] for name in trees}
            for repeat in range(args.repeats):
                for name, tree in trees.items():
                    result = measure(tree)
                    if not Path(result["package"]).is_relative_to(tree):
                        raise RuntimeError(f"{name}: imported {result['package']}, not the package in {tree}")
                    results[name].append(result)
                    print(f"repeat {repeat + 1}/{args.repeats} {name}: {result['seconds']:.2f} s, {result['peak_mb']:.0f} MB",
                          file=sys.stderr, flush=True)
        finally:
            for tree in trees.values():
                if tree != ROOT:
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    print("\n| code | import s, median (min-max) | peak RSS MB, median (min-max) | ML libraries imported |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {spread((r['seconds'] for r in runs), 2)} | {spread((r['peak_mb'] for r in runs), 0)} | "
              f"{runs[-1]['ml_libraries']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
