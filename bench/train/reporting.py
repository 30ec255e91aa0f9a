"""Reporting on the log cadence: the log window read out (the one host sync of an interval),
the curves logged, the half-run admission warning, the progress bar, the progress the sink
shows (a study's display) and a flush of the curves every 10 seconds.

The throughput it reports is training time only: the loop laps the clock after evaluations,
readings and checkpoints (`exclude`).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

from tqdm import tqdm

from bench.train.optim import lr_at
from bench.train.schedule import Clock
from bench.train.sink import Sink


class Reporter:
    def __init__(self, trainer: Any, sink: Sink):
        self.trainer, self.sink = trainer, sink
        self.admitted = False  # has any pseudo-label been used yet (semi-supervised methods)
        self.warned = False    # ... and if not by half the run, has the user been told
        self.clock: Clock | None = None
        self.bar: tqdm | None = None
        self.postfix: dict[str, str] = {}

    @contextlib.contextmanager
    def showing(self, progress: bool) -> Iterator["Reporter"]:
        """A progress bar (rank 0, if `progress`) and a clock for the loop's duration."""
        t = self.trainer
        self.clock = Clock(t.step)
        self.bar = tqdm(total=t.cfg["steps"], initial=t.step, desc=t.cfg["method"], file=sys.stderr,
                        mininterval=2.0, dynamic_ncols=True, disable=not (progress and t.world.is_main), leave=True)
        with self.bar:
            yield self

    def exclude(self) -> None:
        """Time since the last lap was not training (an evaluation, a checkpoint)."""
        self.clock.lap()

    def images_per_s(self) -> float:
        return self.clock.images_per_s()

    def log(self) -> None:
        t = self.trainer
        elapsed, done = self.clock.lap(), t.window.count
        values = self.read_window(elapsed)
        self.clock.count(elapsed, done * (t.n_labeled + t.n_unlabeled))
        self.bar.update(t.step - self.bar.n)
        self.show(progress_fields(values, t.method.status()))
        self.sink.progress({"step": t.step, "steps": t.cfg["steps"], "eta_s": self.clock.eta(t.step, t.cfg["steps"]),
                            "val_acc": t.evaluator.last.get("val_acc")})
        if self.clock.due_for_flush():  # the store's curves stay current
            self.sink.flush()

    def show(self, fields: dict[str, str]) -> None:
        self.postfix.update(fields)
        self.bar.set_postfix(self.postfix, refresh=False)

    def read_window(self, seconds: float) -> dict[str, float]:
        """Move accumulated step logs to the host (one sync per log interval) and record them."""
        t = self.trainer
        if not t.window.count:
            return {}
        t.check_finite()
        count = t.window.count
        values = t.window.take()
        values["img_per_s"] = count * (t.n_labeled + t.n_unlabeled) / max(seconds, 1e-9)
        values["lr"] = lr_at(t.step - 1, t.cfg)
        for k, v in values.items():
            self.sink.log(f"train.{k}", v, t.step)
        self.check_admission(values)
        return values

    def check_admission(self, values: dict[str, float]) -> None:
        """A semi-supervised run that has used no pseudo-label by half its steps is a supervised
        run in disguise: say so once, while it runs (a control uses none by design)."""
        t = self.trainer
        if not t.method_cls.pseudo_labels or self.admitted or self.warned or t.pl_mode.mode != "on":
            return
        self.admitted = values.get("pl_rate", 0.0) > 0
        if not self.admitted and t.step >= t.cfg["steps"] // 2:
            self.warned = True
            self.sink.warn(f"{t.cfg['method']}: no pseudo-label admitted in {t.step} of {t.cfg['steps']} "
                           f"steps; it is training as a supervised run (check --tau / --confidence, the gate, "
                           f"label smoothing)")

    def state_dict(self) -> tuple[bool, bool]:
        return self.admitted, self.warned

    def load_state_dict(self, state: tuple[bool, bool]) -> None:
        self.admitted, self.warned = state


def progress_fields(values: dict[str, float], status: dict[str, str]) -> dict[str, str]:
    """The progress bar's view of a log window: loss, throughput, pseudo-label health."""
    fields = {"loss": f"{values['loss']:.3f}", "img_s": f"{values['img_per_s']:.0f}"} if values else {}
    if "pl_rate" in values:
        fields["pl"] = f"{100 * values['pl_rate']:.0f}%"
    if "pl_precision" in values:
        fields["prec"] = f"{100 * values['pl_precision']:.0f}%"
    return {**fields, **status}
