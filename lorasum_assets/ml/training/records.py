"""What a training is asked (``TrainingRequest``) and what it reports: one log entry per optimizer
step, and the run's result (``TrainResult``, also the message an external training process sends)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lorasum_assets.settings.specs import TrainSpec

if TYPE_CHECKING:
    from lorasum_assets.ml.training.batching import TrainExample


@dataclass(frozen=True)
class TrainingRequest:
    """What to train on, with which settings, and where its checkpoints and adapter go."""

    spec: TrainSpec
    train_examples: list[TrainExample]
    val_examples: list[TrainExample]
    adapter_dir: Path
    checkpoint_dir: Path | None = None  # None: no checkpoints, nothing resumed


@dataclass(frozen=True)
class StepLog:
    step: int
    epoch: float
    loss: float
    learning_rate: float
    grad_norm: float | None  # None when the step was skipped, or its gradients were not finite
    label_tokens: int
    seconds: float
    skipped: bool = False  # the fp16 grad scaler found overflowed gradients: no update, the schedule held


def step_summary(log: StepLog) -> str:
    """A step's figures for the run log."""
    if log.skipped:
        return (f"loss {log.loss:.4f}, skipped: the fp16 grad scaler found overflowed gradients, so nothing was "
                f"updated and the learning rate holds at {log.learning_rate:.2e}, epoch {log.epoch:.2f}")
    norm = "not finite" if log.grad_norm is None else f"{log.grad_norm:.3f}"
    return f"loss {log.loss:.4f}, lr {log.learning_rate:.2e}, grad norm {norm}, epoch {log.epoch:.2f}"


@dataclass
class TrainResult:
    steps: list[StepLog] = field(default_factory=list)
    val_losses: list[float | None] = field(default_factory=list)  # per epoch; None: no validation examples
    total_steps: int = 0
    resumed_from_step: int = 0
    trainable_params: int = 0
    total_params: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    precision: str = "fp32"  # the autocast dtype training ran under (fp32: none)
    grad_scale: float | None = None  # the fp16 grad scaler's scale at the end; None: no scaler ran
    # how the base was held as it trained, read from the loaded model: {method, compute_dtype, double_quant}
    quantization: dict = field(default_factory=dict)
    launcher: dict = field(default_factory=dict)  # where it ran: in_process, or accelerate with its world size and backend
    adapter_sha256: str | None = None  # of adapter_model.safetensors, as the training process wrote it

    def as_message(self) -> dict:
        """The record as JSON-ready values: what an external training process sends back."""
        return asdict(self)

    @classmethod
    def from_message(cls, message: dict) -> TrainResult:
        fields = {key: value for key, value in message.items() if key in cls.__dataclass_fields__}
        return cls(**{**fields, "steps": [StepLog(**row) for row in message.get("steps", [])]})

    @property
    def padding_efficiency(self) -> float:
        return round(self.real_tokens / max(self.padded_tokens, 1), 4)

    @property
    def skipped_steps(self) -> list[int]:
        return [log.step for log in self.steps if log.skipped]

    @property
    def final_train_loss(self) -> float | None:
        return self.steps[-1].loss if self.steps else None

    @property
    def final_val_loss(self) -> float | None:
        known = [v for v in self.val_losses if v is not None]
        return known[-1] if known else None


def epoch_summary(epoch: int, val_loss: float | None) -> str:
    """An epoch's line for the run log."""
    return f"epoch {epoch}: validation loss {'none (no validation examples)' if val_loss is None else f'{val_loss:.4f}'}"
