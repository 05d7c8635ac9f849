"""LoRA training as an external process: ``accelerate launch -m lorasum_assets.workers.train_worker JOB``.

Every process started by accelerate runs this. The main one opens the Dagster Pipes channel,
streams a log line per optimizer step, saves the adapter and reports the
materialization; the others only train their share. The job file says what to train; secrets
come from the environment, never from the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from dataclasses import asdict, replace
from pathlib import Path

from lorasum_assets.ml.models.loading import ModelSpec, load_model, load_tokenizer
from lorasum_assets.ml.training.batching import TrainExample
from lorasum_assets.ml.training.records import TrainingRequest, TrainResult, epoch_summary, step_summary
from lorasum_assets.ml.training.run import TrainingHooks, train_adapter
from lorasum_assets.settings.env import HF_TOKEN_ENV, get_env
from lorasum_assets.settings.specs import TrainSpec

JOB_VERSION = 1
RESULT_MESSAGE = "result"  # the kind of the one Pipes message that carries the TrainResult


def write_job(path: Path, *, model: ModelSpec, request: TrainingRequest) -> Path:
    """Everything the worker needs, as JSON; the model token is left out (it travels as HF_TOKEN)."""
    model_fields = {k: v for k, v in asdict(model).items() if k != "token"}
    payload = {
        "version": JOB_VERSION,
        "model": model_fields,
        "spec": asdict(request.spec),
        "train": [[list(e.input_ids), list(e.labels)] for e in request.train_examples],
        "validation": [[list(e.input_ids), list(e.labels)] for e in request.val_examples],
        "checkpoint_dir": str(request.checkpoint_dir),
        "adapter_dir": str(request.adapter_dir),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch_command(
    job_path: Path, num_processes: int, threads_per_process: int | None = None, summary_path: Path | None = None
) -> list[str]:
    """``accelerate launch`` for this worker. With more than one process it is accelerate's
    multi-process launcher (torchrun underneath): NCCL across GPUs, gloo across CPU processes."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    threads = threads_per_process or max(1, (os.cpu_count() or 1) // num_processes)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--num_cpu_threads_per_process", str(threads)]
    if num_processes > 1:
        command += ["--multi_gpu", "--main_process_port", str(free_port())]
    command += ["-m", "lorasum_assets.workers.train_worker", str(job_path)]
    return command + (["--summary-json", str(summary_path)] if summary_path else [])


def read_job(path: Path) -> tuple[ModelSpec, TrainingRequest]:
    job = json.loads(Path(path).read_text())
    if job.get("version") != JOB_VERSION:
        raise ValueError(f"{path}: job version {job.get('version')!r}, this worker reads version {JOB_VERSION}")
    spec_fields = dict(job["spec"])
    spec_fields["target_modules"] = tuple(spec_fields["target_modules"])
    request = TrainingRequest(
        spec=TrainSpec(**spec_fields),
        train_examples=[TrainExample(ids, labels) for ids, labels in job["train"]],
        val_examples=[TrainExample(ids, labels) for ids, labels in job["validation"]],
        checkpoint_dir=Path(job["checkpoint_dir"]),
        adapter_dir=Path(job["adapter_dir"]),
    )
    return ModelSpec(**job["model"], token=get_env(HF_TOKEN_ENV)), request


def run(job_path: Path, summary_path: Path | None = None) -> None:
    import torch
    from accelerate import Accelerator

    model_spec, request = read_job(job_path)
    # cpu=True is what makes accelerate form a gloo process group when there is no GPU; training
    # sets its own autocast, so accelerate's mixed precision stays off.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    if accelerator.device.type == "cuda":
        model_spec = replace(model_spec, device=str(accelerator.device))
    with contextlib.ExitStack() as stack:
        pipes = None
        if accelerator.is_main_process:
            from dagster_pipes import open_dagster_pipes

            pipes = stack.enter_context(open_dagster_pipes())
        hooks = TrainingHooks(on_step=lambda log: pipes.log.info(f"step {log.step}: {step_summary(log)}"),
                              on_epoch=lambda epoch, val_loss: pipes.log.info(epoch_summary(epoch, val_loss))) if pipes else TrainingHooks()
        result = train_adapter(request, load=lambda: (load_tokenizer(model_spec), load_model(model_spec)), hooks=hooks,
                               accelerator=accelerator, loading=accelerator.main_process_first())
        if pipes is not None:
            _report(pipes, result, summary_path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from lorasum_assets.runtime.quiet import quiet_known_noise

    quiet_known_noise()

    parser = argparse.ArgumentParser(prog="accelerate launch -m lorasum_assets.workers.train_worker")
    parser.add_argument("job", type=Path, help="the job file the lora_adapter asset wrote")
    parser.add_argument("--summary-json", type=Path, help="also write the run's figures here (main process)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run(args.job, args.summary_json)
    return 0


def _report(pipes, result: TrainResult, summary_path: Path | None) -> None:
    """The record as a Pipes message, and the run's figures as materialization metadata;
    ``summary_path`` gets them as JSON too (benchmarks read it)."""
    if result.resumed_from_step:
        pipes.log.info(f"resumed from checkpoint at step {result.resumed_from_step} of {result.total_steps}")
    pipes.report_custom_message({"kind": RESULT_MESSAGE, "record": result.as_message()})
    metadata = {
        **result.launcher,
        "optimizer_steps": result.total_steps,
        "final_train_loss": result.final_train_loss,
        "val_losses": [v for v in result.val_losses if v is not None],
        "padding_efficiency": result.padding_efficiency,
        "train_seconds": round(result.seconds, 2),
        "sha256": result.adapter_sha256,
    }
    pipes.report_asset_materialization(metadata=metadata, data_version=result.adapter_sha256[:16])
    if summary_path is not None:
        summary = {**metadata, "losses": [s.loss for s in result.steps], "real_tokens": result.real_tokens,
                   "resumed_from_step": result.resumed_from_step}
        Path(summary_path).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
