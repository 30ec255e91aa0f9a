"""Multi-stage training: the stages a method declares (`bench.method.stage`) planned once,
content-addressed and reused.

`plan(cfg, method)` is the one list of stages a run trains, with each stage's resolved config:
it is computed once per run (`bench.run.runner.prepare`) and read by every caller (the checks,
the world-size check, the stage training).

Every classifying method may start from the MAE pretraining stage (`--start mae`); mae_finetune
and semi_vit do by default. The stage's result is cached under `<results_dir>/stages/<hash>/`,
keyed by what the stage reads and the stages before it, so every method of a seed shares one MAE
encoder, and Semi-ViT's supervised stage is the very fine-tune mae_finetune reports (its run IS
that stage: `Method.own_training = False`). A stage killed mid-way resumes from its own checkpoint
the next time any run needs it; concurrent runs needing one stage wait for each other (file lock).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bench.train import checkpoint
from bench.distributed import barrier, broadcast, world
from bench.io import atomic_write_text, read_json
from bench.method.stage import Stage, stages_of

# Bumped when what a stage computes from the same config changes, or what keys it, so older
# cached stages are not reused (2: images and augmentations drawn from (seed, step); 3: stage
# configs hold only the stage method's options, the pretraining stage is shared by every method).
STAGE_FORMAT = 3

SPLIT_KEYS = {"label_fraction", "labels_per_class", "val_fraction", "val_per_class", "unlabeled_pool", "split_file",
              "split_format", "val_from"}
MECHANICS_KEYS = {"eval_every", "ckpt_every", "log_every"}


@dataclass(frozen=True)
class PlannedStage:
    stage: Stage
    method_cls: type
    cfg: dict[str, Any]       # the stage's resolved config


def plan(cfg: dict[str, Any], method_cls) -> list[PlannedStage]:
    """The stages a run trains before its own training, in order, each with its config."""
    from bench.method.base import get_method
    return [PlannedStage(s, get_method(s.method), stage_config(cfg, s, get_method(s.method)))
            for s in stages_of(cfg, method_cls)]


def stage_config(cfg: dict[str, Any], stage: Stage, method_cls) -> dict[str, Any]:
    """The stage's resolved config: the run's core options of the groups the stage inherits (the
    stage method's defaults for the others, and for its own options) < the stage's settable
    options, at the run's value where the run sets them, else the stage's default."""
    from bench.config import CORE_OPTIONS, defaults
    base = defaults(method_cls)
    scfg = {k: cfg[k] if opt.group in stage.inherits else base[k] for k, opt in CORE_OPTIONS.items()}
    scfg.update({k: base[k] for k in method_cls.options})
    for name in stage.settable:
        value = cfg.get(stage.prefix + name)
        if value is not None:  # unset: the stage keeps the run's (or its method's) value
            scfg[name] = value
    if not stage.prefix:  # the run's own training: its options are the stage's
        scfg.update({k: cfg[k] for k in method_cls.options if k in cfg})
    scfg["method"], scfg["preset"] = method_cls.name, cfg.get("preset")
    if cfg.get("store_used"):  # decided once per run: every stage reads the same store
        scfg["store_used"] = cfg["store_used"]
    return scfg


def stage_key(scfg: dict[str, Any], method_cls, previous: str | None, dataset_hash: str, split_hash: str) -> str:
    """Hash of everything that determines a stage's weights."""
    from bench.config import IDENTITY_EXCLUDED
    # a split file counts by its content (its sha256 is in the split's hash), not by its path
    ignored = IDENTITY_EXCLUDED | MECHANICS_KEYS | {"preset", "split_file"}
    if not method_cls.uses_labeled:
        ignored |= SPLIT_KEYS  # a label-free stage sees every training image, whatever the split
        split_hash = ""
    key = {k: v for k, v in scfg.items() if k not in ignored}
    blob = json.dumps({"config": key, "previous": previous, "data": dataset_hash, "split": split_hash,
                       "format": STAGE_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def run_stage(stage_dir: Path, train: Callable[[Path], None]) -> tuple[dict[str, Any], bool]:
    """Return the stage's final weights, training them with `train(stage_dir)` unless cached.
    Returns (weights, reused). Across ranks, rank 0 holds the lock and decides; every rank
    trains (rank 0 writes) and then reads the same final weights."""
    main = world().is_main
    final = stage_dir / "final.pt"
    with contextlib.ExitStack() as stack:
        if main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            lock = stack.enter_context(open(stage_dir / ".lock", "w"))
            fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run needing this stage waits here
        reused = broadcast(final.exists())
        if not reused:
            train(stage_dir)
        barrier()
        return checkpoint.load(final), reused


def save_final(stage_dir: Path, model: torch.nn.Module, ema_model: torch.nn.Module, scfg: dict, result: dict,
               init: dict | None = None) -> None:
    """The stage's final weights, and its config, result and where its weights came from."""
    checkpoint.save(stage_dir / "final.pt", {"model": model.state_dict(), "ema": ema_model.state_dict()})
    atomic_write_text(stage_dir / "stage.json", json.dumps({"config": scfg, "result": result, "init": init or {}},
                                                           indent=2, default=str))


def stage_result(stage_dir: Path) -> dict[str, Any]:
    """The recorded result of a trained stage ({} if it has none)."""
    return read_json(stage_dir / "stage.json").get("result") or {}


class StageCurves:
    """A stage's logged curves, kept in its folder (`metrics.json`) so that a run reusing the
    stage can show them; written at every flush, cut back to the checkpoint on a resume."""

    def __init__(self, stage_dir: Path, resume_step: int | None = None):
        self.path = Path(stage_dir) / "metrics.json"
        self.series: dict[str, dict[str, list]] = {}
        if resume_step is not None:
            for name, s in read_json(self.path).items():
                keep = [i for i, t in enumerate(s["steps"]) if t <= resume_step]
                self.series[name] = {"steps": [s["steps"][i] for i in keep], "values": [s["values"][i] for i in keep]}

    def log(self, name: str, value: float, step: int) -> None:
        s = self.series.setdefault(name, {"steps": [], "values": []})
        s["steps"].append(int(step))
        s["values"].append(float(value))

    def flush(self) -> None:
        if world().is_main:
            atomic_write_text(self.path, json.dumps(self.series))


def stage_curves(stage_dir: Path) -> dict[str, dict[str, list]]:
    """The curves a trained stage logged ({} for a stage cached before they were kept)."""
    return read_json(Path(stage_dir) / "metrics.json")


