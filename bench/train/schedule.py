"""The training loop's cadences as one schedule of named events, and its clock.

After every optimizer step the engine asks the schedule which events are due, in order: `log`
(read the log window, show progress), `evaluate` (validation and test), `read` (a method's extra
validation reading, e.g. a gate decided more often than the test set is evaluated; skipped where
an evaluation falls), `checkpoint`. An event is due every `every` steps (any of several
cadences) and, if `at_end`, at the last step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    name: str
    every: tuple[int, ...] = ()
    at_end: bool = False
    unless: str | None = None   # not due when this other event is


@dataclass
class Schedule:
    steps: int
    events: list[Event]

    def due(self, step: int) -> list[str]:
        """Names of the events due after optimizer step `step` (1-based count), in order."""
        due = [e for e in self.events
               if any(step % every == 0 for every in e.every) or (e.at_end and step == self.steps)]
        names = {e.name for e in due}
        return [e.name for e in due if e.unless not in names]


class Clock:
    """Training throughput without evaluation or checkpoint time, the ETA, and when to write
    the store's curves (every 10 s)."""

    def __init__(self, step: int):
        self.start, self.start_step = time.perf_counter(), step
        self.mark = self.last_flush = self.start
        self.seconds, self.images = 0.0, 0

    def lap(self) -> float:
        """Seconds since the last lap, which starts a new one."""
        now = time.perf_counter()
        elapsed, self.mark = now - self.mark, now
        return elapsed

    def count(self, seconds: float, images: int) -> None:
        self.seconds += seconds
        self.images += images

    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def eta(self, step: int, steps: int) -> float:
        rate = (step - self.start_step) / max(time.perf_counter() - self.start, 1e-9)
        return (steps - step) / max(rate, 1e-9)

    def due_for_flush(self, every_s: float = 10.0) -> bool:
        now = time.perf_counter()
        if now - self.last_flush > every_s:
            self.last_flush = now
            return True
        return False
