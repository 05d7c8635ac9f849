"""What the benchmarks share: DialogSum's dev and test dialogues, training examples, and running
each variant in a fresh process, interleaved and repeated."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` (the DialogSum files) and ``--cache`` (the model cache), as every benchmark has them."""
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "dialogsum"), help="DialogSum folder")
    parser.add_argument("--cache", default=str(ROOT / ".lorasum" / "models"), help="model cache")


def spread(values: Iterable[float], digits: int = 1) -> str:
    """``median (min-max)``, the way every benchmark table reports repeats."""
    values = list(values)
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def dialogsum_splits(data: str) -> tuple[list, list]:
    """The dev (validation) and test dialogues of the DialogSum files in ``data``, in file order."""
    from lorasum_assets.ml.data.dialogues import normalise
    from lorasum_assets.ml.data.readers import read_local

    dialogues = normalise(read_local(data), "local").dialogues
    return [d for d in dialogues if d.split == "validation"], [d for d in dialogues if d.split == "test"]


def training_examples(tokenizer, dialogues: Sequence, max_length: int, boundary: str = "natural") -> list:
    """Each dialogue with its first reference summary, encoded for training."""
    from lorasum_assets.ml.data.prompts import encode_example
    from lorasum_assets.ml.training.batching import TrainExample

    examples = []
    for d in dialogues:
        e = encode_example(tokenizer, d.dialogue, d.references[0], max_length, boundary=boundary)
        examples.append(TrainExample(e.input_ids, e.labels))
    return examples


def run_interleaved(
    module: str, arguments: Sequence[str], variants: Sequence[str], repeats: int, describe: Callable[[dict], str]
) -> dict[str, list[dict]] | None:
    """Run ``python -m module --worker VARIANT`` for every variant in a fresh process, the variants interleaved,
    ``repeats`` rounds. A worker prints its result as one line ``RESULT <json>``. Returns the results
    per variant, or None (after printing the worker's stderr) when one fails."""
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(repeats):
        for variant in variants:
            done = subprocess.run([sys.executable, "-m", module, *arguments, "--worker", variant], cwd=ROOT,
                                  capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                print(f"{variant} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                return None
            results[variant].append(json.loads(line[len("RESULT "):]))
            print(f"repeat {repeat + 1}/{repeats} {variant}: {describe(results[variant][-1])}", file=sys.stderr, flush=True)
    return results


def run_whole_graph(tree, env: dict[str, str], models=None) -> float:
    """``dagster asset materialize --select '*'`` from ``tree`` in a fresh home (sharing the model
    cache ``models`` when given); returns seconds."""
    import os
    import tempfile
    import time
    from pathlib import Path

    with tempfile.TemporaryDirectory() as home:
        run_env = {**os.environ, "LORASUM_HOME": home, "DAGSTER_HOME": str(Path(home) / "dagster"), "HF_HUB_OFFLINE": "1", **env}
        Path(run_env["DAGSTER_HOME"]).mkdir()
        if models is not None:
            (Path(home) / "models").symlink_to(models, target_is_directory=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "dagster", "asset", "materialize", "-m", "lorasum_assets.definitions",
                               "--select", "*"], cwd=tree, env=run_env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the graph failed:\n{done.stderr[-3000:]}")
    return seconds


def print_host() -> None:
    """The line every benchmark prints before its figures: the CPU's model and its bf16/AMX flags
    (speeds differ by CPU kind), the cores, and torch."""
    import torch

    from lorasum_assets.ml.models.devices import describe_device

    print(f"host: {describe_device('cpu')}; {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)


def run_command(commands: dict[str, Callable[[list[str]], int]], usage: str, argv: list[str] | None = None) -> int:
    """``python -m benchmarks.X COMMAND [options]``: the command's function on the options, or
    ``usage`` (the module's docstring) and exit 2 without a known command."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in commands:
        print(usage, file=sys.stderr)
        return 2
    if "--worker" not in argv:
        print_host()
    return commands[argv[0]](argv[1:])


def print_result(result: dict) -> None:
    """A worker's answer to ``run_interleaved``."""
    print("RESULT " + json.dumps(result), flush=True)
