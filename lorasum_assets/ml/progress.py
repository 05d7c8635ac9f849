"""Progress lines for long work (training steps, generated summaries) and a heartbeat while a batch decodes."""

from __future__ import annotations

import time
from collections.abc import Callable


class Progress:
    """Log lines for long work: done/total, the rate over the last ``window`` updates and the time
    left. There is no rate before the second update; an update that took far longer than the others
    (over ``stall_s`` and 5x their median) is reported as a stall and kept out of the rate.

    ``start_at`` marks the moment work began (generation); without it the first update is the
    first mark (training, where the first step's time includes warming up)."""

    def __init__(self, total: int, unit: str, start_at: int | None = None, window: int = 10, stall_s: float = 30.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.unit, self.window, self.stall_s, self.clock = total, unit, window, stall_s, clock
        self.marks: list[tuple[float, int]] = [] if start_at is None else [(clock(), start_at)]

    def line(self, done: int) -> str:
        now = self.clock()
        self.marks = [*self.marks[-self.window:], (now, done)]
        head = f"{done}/{self.total} {self.unit}"
        if len(self.marks) < 2:
            return f"{head}, rate from the next update on"
        intervals = [(t1 - t0, d1 - d0) for (t0, d0), (t1, d1) in zip(self.marks, self.marks[1:])]
        seconds = sorted(s for s, _ in intervals)
        median = seconds[len(seconds) // 2]
        steady = [(s, n) for s, n in intervals if not (s > self.stall_s and s > 5 * median)] or intervals[-1:]
        rate = sum(n for _, n in steady) / max(sum(s for s, _ in steady), 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("nan")
        eta = f"~{left:.0f} s left" if left == left else "time left unknown"
        stall = intervals[-1][0]
        note = f" (after a stall of {stall:.0f} s)" if stall > self.stall_s and stall > 5 * median else ""
        return f"{head}, {rate:.2f} {self.unit}/s, {eta}{note}"


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
