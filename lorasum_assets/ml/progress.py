"""What training reports: one log entry per optimizer step, and the run's result."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepLog:
    step: int
    epoch: float
    loss: float
    learning_rate: float
    grad_norm: float
    label_tokens: int
    seconds: float


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

    @property
    def final_train_loss(self) -> float | None:
        return self.steps[-1].loss if self.steps else None

    @property
    def final_val_loss(self) -> float | None:
        return self.val_losses[-1] if self.val_losses else None


class Progress:
    """Log lines for long work: done/total, rate and time left."""

    def __init__(self, total: int, unit: str, start_at: int = 0) -> None:
        self.total, self.unit, self.start_at = total, unit, start_at
        self.started = time.perf_counter()

    def line(self, done: int) -> str:
        elapsed = time.perf_counter() - self.started
        rate = (done - self.start_at) / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else float("nan")
        eta = f"~{left:.0f} s left" if left == left else "time left unknown"
        return f"{done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, {eta}"


class DecodingHeartbeat:
    """A ``generate`` streamer that reports, at most every ``every_s`` seconds, how far decoding of
    the current batch has come: batches of many prompts are one call and would otherwise be silent."""

    def __init__(self, report: Callable[[str], None], label: str, max_new_tokens: int, every_s: float = 10.0) -> None:
        self.report, self.label, self.max_new_tokens, self.every_s = report, label, max_new_tokens, every_s
        self.steps, self.last = -1, time.perf_counter()  # the first put() is the prompt

    def put(self, value) -> None:
        self.steps += 1
        now = time.perf_counter()
        if self.steps > 0 and now - self.last >= self.every_s:
            self.last = now
            self.report(f"{self.label}: decoding, {self.steps}/{self.max_new_tokens} new tokens so far")

    def end(self) -> None:
        pass
