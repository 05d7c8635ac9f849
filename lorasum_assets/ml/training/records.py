"""What training reports: one log entry per optimizer step, and the run's result."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    val_losses: list[float] = field(default_factory=list)
    total_steps: int = 0
    resumed_from_step: int = 0
    trainable_params: int = 0
    total_params: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    precision: str = "fp32"  # the autocast dtype training ran under (fp32: none)
    grad_scale: float | None = None  # the fp16 grad scaler's scale at the end; None: no scaler ran

    @property
    def skipped_steps(self) -> list[int]:
        return [log.step for log in self.steps if log.skipped]

    @property
    def final_train_loss(self) -> float | None:
        return self.steps[-1].loss if self.steps else None

    @property
    def final_val_loss(self) -> float | None:
        return self.val_losses[-1] if self.val_losses else None
