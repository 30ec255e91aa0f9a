"""A training's sink (bench.train.sink) when it is a tracked run, or one of its stages."""
from __future__ import annotations

from typing import Any, Callable

from bench.run.link import StudyLink
from bench.run.tracking import RunHandle
from bench.train.sink import Sink


class RecordSink(Sink):
    """Curves into the run's Sacred record (rank 0: the only rank with a record), prefixed for
    an earlier stage (`finetune.val_acc`) and also kept in the stage's folder (`curves`, so a run
    that reuses the stage can show them); warnings into the record (the run's own training);
    progress to the study's display; validation readings to `on_validation` (a search's pruner)."""

    def __init__(self, record: RunHandle | None, link: StudyLink, *, prefix: str = "", curves=None,
                 stage: str = "", on_validation: Callable[[int, dict], None] | None = None, warns: bool = True):
        self.record, self.link, self.prefix, self.curves = record, link, prefix, curves
        self.stage, self.on_validation, self.warns = stage, on_validation, warns

    def log(self, name: str, value: float, step: int) -> None:
        if self.curves is not None:
            self.curves.log(name, value, step)
        if self.record is not None:
            self.record.log_scalar(self.prefix + name, value, step)

    def flush(self) -> None:
        if self.curves is not None:
            self.curves.flush()
        if self.record is not None:
            self.record.flush()

    def warn(self, message: str) -> None:
        if self.record is not None and self.warns:
            self.record.warn(message)

    def progress(self, progress: dict[str, Any]) -> None:
        self.link.report(self.stage, progress)

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        if self.on_validation is not None:
            self.on_validation(step, metrics)
