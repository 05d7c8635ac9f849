"""Resumable checkpoints: adapter weights, optimizer, scheduler, RNG state and the step log.

A checkpoint is written to a staging folder and renamed into place with a COMPLETE marker, so a
run killed while writing one resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from lorasum_assets.ml.models.adapter_files import trainable_bytes, write_failure
from lorasum_assets.ml.training.records import StepLog, TrainResult


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    if not checkpoint_dir.exists():
        return []
    found = [p for p in checkpoint_dir.glob("step-*") if (p / "COMPLETE").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; its partial files were removed."""


@dataclass
class TrainState:
    """What a training changes and a checkpoint holds, besides the step log: the model (its LoRA
    weights), the optimizer, the learning-rate schedule and the fp16 grad scaler (None without one)."""

    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any = None


def save_checkpoint(checkpoint_dir: Path, step: int, state: TrainState, result: TrainResult) -> None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".step-", dir=checkpoint_dir))
    try:
        _write_checkpoint(staging, step, state, result)
    except Exception as exc:
        # the weights and Adam's two moments of each trainable weight
        raise write_failure(f"the checkpoint of step {step}", checkpoint_dir, 3 * trainable_bytes(state.model), exc,
                            CheckpointWriteError) from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for old in complete_checkpoints(checkpoint_dir)[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def _write_checkpoint(staging: Path, step: int, state: TrainState, result: TrainResult) -> None:
    adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(state.model).items()}
    save_file(adapter, str(staging / "adapter.safetensors"))
    saved = {
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    if state.scaler is not None:
        saved["scaler"] = state.scaler.state_dict()
    if torch.cuda.is_available():
        saved["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(saved, staging / "trainer_state.pt")
    meta = {"step": step, "val_losses": result.val_losses, "steps": [asdict(s) for s in result.steps]}
    (staging / "progress.json").write_text(json.dumps(meta))
    (staging / "COMPLETE").write_text("ok")
    final = staging.parent / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)


def load_checkpoint(path: Path, state: TrainState, result: TrainResult) -> int:
    set_peft_model_state_dict(state.model, load_file(str(path / "adapter.safetensors")))
    # On the CPU first: under DDP every rank would otherwise load the optimizer state onto cuda:0;
    # load_state_dict moves each tensor to its parameter's device.
    saved = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    if state.scaler is not None and "scaler" in saved:
        state.scaler.load_state_dict(saved["scaler"])
    if "cuda_rng" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    meta = json.loads((path / "progress.json").read_text())
    result.val_losses = list(meta["val_losses"])
    result.steps = [StepLog(**s) for s in meta["steps"]]
    return int(meta["step"])
