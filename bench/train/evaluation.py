"""Evaluation on its cadence: validation and test of the raw and EMA models, the method's
validation readings, and the checkpoint selected on validation.

The method sees validation only (its gate); the test set is only ever evaluated. Selection reads
validation only: the evaluation point whose raw or EMA model has the best validation accuracy is
kept (`selected.pt`, written by rank 0), with its test accuracy for the record.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.distributed import world
from bench.method.evaluate import Evaluation, evaluate
from bench.train import checkpoint
from bench.train.sink import Sink


@dataclass
class Selection:
    """The evaluation point chosen on validation accuracy (raw or EMA model)."""
    step: int = -1
    model: str = ""
    val_acc: float = -1.0
    test_acc: float = float("nan")


@dataclass
class Evaluator:
    trainer: Any          # the Trainer whose models, stores and method are evaluated
    sink: Sink
    run_dir: Path
    selection: Selection = field(default_factory=Selection)
    last: dict[str, float] = field(default_factory=dict)  # the latest evaluation's accuracies

    def _on(self, store, idx, y) -> dict[str, Evaluation]:
        t = self.trainer
        return {tag: evaluate(model, store, idx, y, t.views.eval, t.cfg["eval_batch_size"], t.autocast)
                for tag, model in (("raw", t.model), ("ema", t.ema.model))}

    def validation(self) -> dict[str, Evaluation]:
        """The raw and EMA models on the validation split (sharded over ranks)."""
        t = self.trainer
        val = t.method.data.val
        return self._on(t.train_store, val, t.train_y[val])

    def _method_reads(self, val: dict[str, Evaluation]) -> None:
        t = self.trainer
        for k, v in (t.method.on_validation(val, t.step) or {}).items():
            self.sink.log(k, float(v), t.step)

    def read(self) -> None:
        """A validation-only reading for the method (e.g. its gate), between evaluations; it
        takes no part in selection, which needs the test accuracy of its point."""
        self.trainer.check_finite()
        self._method_reads(self.validation())

    def evaluate(self) -> dict[str, float]:
        t = self.trainer
        t.check_finite()
        val = self.validation()
        test = self._on(t.test_store, t.test_idx, t.test_y)
        self._method_reads(val)  # the method sees validation only
        metrics = {"val_acc": val["raw"].acc, "val_acc_ema": val["ema"].acc,
                   "test_acc": test["raw"].acc, "test_acc_ema": test["ema"].acc}
        for k, v in metrics.items():
            self.sink.log(k, v, t.step)
        for tag in ("raw", "ema"):
            if val[tag].acc > self.selection.val_acc:  # selection reads validation only
                self.selection = Selection(t.step, tag, val[tag].acc, test[tag].acc)
                model = t.model if tag == "raw" else t.ema.model
                if world().is_main:
                    checkpoint.save(self.run_dir / "selected.pt", {"step": t.step, "model": tag,
                                                                   "state_dict": model.state_dict()})
        self.last = metrics
        self.sink.validation(t.step, {k: v for k, v in metrics.items() if k.startswith("val_")})
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"selection": vars(self.selection).copy(), "last_eval": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.selection = Selection(**state["selection"])
        self.last = dict(state["last_eval"])
