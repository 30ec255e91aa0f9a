"""Where a training's outputs go: one interface in place of loose callbacks.

A Trainer logs curves, persists them (before every checkpoint, and every few seconds), warns,
reports progress and hands validation readings on, all to its `Sink`. The base class drops
everything (a rank other than 0, a throwaway Trainer); the run's sink writes the Sacred record,
a stage's also keeps the stage's curves (`bench.run.sinks`).
"""
from __future__ import annotations

from typing import Any


class Sink:
    def log(self, name: str, value: float, step: int) -> None:
        """One point of curve `name`."""

    def flush(self) -> None:
        """Persist what was logged (called before every checkpoint: a kill leaves no gap)."""

    def warn(self, message: str) -> None:
        """A health warning, shown and kept."""

    def progress(self, progress: dict[str, Any]) -> None:
        """At each log: step, steps, eta_s and the last validation accuracy."""

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation: the validation accuracies only (e.g. a search's pruner)."""
