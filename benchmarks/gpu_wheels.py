"""The wheels benchmarks/gpu_check.sh needs on a GPU machine that has no network, downloaded here.

The machine we are lent has Python 3.12 with torch, transformers, peft, accelerate, safetensors,
sentencepiece, pandas and pyarrow (and their own dependencies), and no network. Everything else
the check imports (bitsandbytes, dagster, duckdb and its DuckLake and SQLite extensions,
bert_score, rouge_score, matplotlib, tensorboard, TRL, ...) is taken from requirements.lock, at the
lock's versions, with the dependencies the lock records for it, built for that Python, and laid
out in parts of at most --part-mib each (the check's runs carry 64 MiB in all, code included):

    python -m benchmarks.gpu_wheels            # -> benchmarks/gpu_wheels/part-1, part-2, ...

Carry one part per run (bitsandbytes alone is about 43 MB); gpu_check.sh installs every part it
finds, offline and without dependencies, and installs survive between runs while the machine stays
warm. The folder is git-ignored, so name it in the run's carry.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
OUT = ROOT / "benchmarks" / "gpu_wheels"
# what gpu_check.py's steps import that the GPU machine lacks
NEEDED = ("bitsandbytes", "dagster", "duckdb", "duckdb-ext-ducklake", "duckdb-ext-sqlite", "bert-score", "rouge-score", "matplotlib",
          "tensorboard", "trl", "datasets", "gguf",
          # ours over the machine's: its transformers 5.17 fails the merged export in save_pretrained
          # (revert_weight_conversion raises NotImplementedError; measured here with 5.17.0 and our lock otherwise)
          "transformers", "huggingface-hub", "tokenizers", "peft", "accelerate", "safetensors")
# on the machine already (its torch stack), so neither carried nor followed into
ON_THE_MACHINE = ("torch", "sentencepiece", "pandas", "pyarrow", "numpy", "regex", "requests", "tqdm", "filelock", "fsspec", "jinja2", "markupsafe",
                  "networkx", "sympy", "mpmath", "typing-extensions", "packaging", "psutil", "python-dateutil", "pytz", "tzdata",
                  "six", "certifi", "charset-normalizer", "idna", "urllib3", "hf-xet", "setuptools", "pip", "wheel", "pyyaml")


def locked() -> tuple[dict[str, str], dict[str, set[str]]]:
    """The lock's pins, and what each package depends on (from its ``# via`` lines)."""
    pins: dict[str, str] = {}
    needs: dict[str, set[str]] = {}
    current = None
    for line in LOCK.read_text().splitlines():
        pinned = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if pinned:
            current = pinned.group(1).lower().replace("_", "-")
            pins[current] = pinned.group(2)
            continue
        via = re.match(r"^\s+#\s+(?:via\s+)?([A-Za-z0-9_.\-]+)\s*$", line)
        if current and via and via.group(1) != "via":
            needs.setdefault(via.group(1).lower().replace("_", "-"), set()).add(current)
    return pins, needs


def closure(roots, pins: dict[str, str], needs: dict[str, set[str]]) -> list[str]:
    todo, seen = [r for r in roots if r not in ON_THE_MACHINE], set()
    while todo:
        name = todo.pop()
        if name in seen or name in ON_THE_MACHINE or name not in pins:
            continue
        seen.add(name)
        todo.extend(needs.get(name, ()))
    return sorted(seen)


def download(names: list[str], pins: dict[str, str], python_version: str, into: Path) -> None:
    platform = ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                "--platform", "manylinux_2_24_x86_64", "--platform", "any"]
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
            "--implementation", "cp", *platform, "-d", str(into)]
    for name in names:
        done = subprocess.run([*base, f"{name}=={pins[name]}"], capture_output=True, text=True)
        if done.returncode == 0:
            continue
        # published as an sdist only (rouge-score): built here, and carried only if pure Python
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(into), f"{name}=={pins[name]}"],
                               capture_output=True, text=True)
        made = sorted(into.glob(f"{name.replace('-', '_')}-{pins[name]}-*.whl"))
        if built.returncode != 0 or not made or not made[0].name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"{name}=={pins[name]}: no wheel for Python {python_version}, and none pure Python to build:\n"
                             f"{done.stderr[-800:]}{built.stderr[-800:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--part-mib", type=float, default=57.5, help="largest part, MiB (a run carries 64 MiB, code included)")
    args = parser.parse_args()
    pins, needs = locked()
    names = closure([n.lower() for n in NEEDED], pins, needs)
    staging = Path(tempfile.mkdtemp(prefix="gpu-wheels-"))
    download(names, pins, args.python_version, staging)
    wheels = sorted(staging.glob("*.whl"), key=lambda p: -p.stat().st_size)
    limit = args.part_mib * 2**20
    parts: list[list[Path]] = []
    for wheel in wheels:  # largest first, each into the first part it fits
        if wheel.stat().st_size > limit:
            raise SystemExit(f"{wheel.name} alone is {wheel.stat().st_size / 2**20:.1f} MiB, over --part-mib {args.part_mib}")
        part = next((p for p in parts if sum(w.stat().st_size for w in p) + wheel.stat().st_size <= limit), None)
        if part is None:
            parts.append(part := [])
        part.append(wheel)
    shutil.rmtree(OUT, ignore_errors=True)
    for number, part in enumerate(parts, start=1):
        folder = OUT / f"part-{number}"
        folder.mkdir(parents=True)
        for wheel in part:
            shutil.move(str(wheel), folder / wheel.name)
        print(f"{folder.relative_to(ROOT)}: {len(part)} wheels, {sum(w.stat().st_size for w in folder.iterdir()) / 2**20:.1f} MiB")
    shutil.rmtree(staging, ignore_errors=True)
    print(f"{len(names)} packages for Python {args.python_version} in {len(parts)} parts under {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
