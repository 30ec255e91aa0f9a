"""Multi-stage training: the stages a method declares (`bench.method.stage`) planned once,
content-addressed and reused.

`plan(cfg, method)` is the one list of stages a run trains, with each stage's resolved config:
it is computed once per run (`bench.run.prepare`) and read by every caller (the checks,
the world-size check, the stage training).

Every classifying method may start from the MAE pretraining stage (`--start mae`); mae_finetune
and semi_vit do by default. The stage's result is cached under `<results_dir>/stages/<hash>/`,
keyed by what the stage reads and the stages before it, so every method of a seed shares one MAE
encoder, and Semi-ViT's supervised stage is the very fine-tune mae_finetune reports (its run IS
that stage: `Method.own_training = False`). A stage killed mid-way resumes from its own checkpoint
the next time any run needs it; concurrent runs needing one stage wait for each other (file lock).
A stage kept with the published results (`<results_dir>/published/stages/<set>/<key>/`) serves a
run whose cache lacks that key: it is copied in instead of trained (the key hashes the data's
content, so it only ever serves the very same stage).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench.distributed import barrier, broadcast, world
from bench.io import atomic_write, atomic_write_text, read_json
from bench.method.stage import Stage, stages_of
from bench.run.link import StudyLink
from bench.run.sinks import RecordSink
from bench.run.tracking import RunHandle
from bench.train import checkpoint
from bench.train.trainer import Trainer

# Bumped when what a stage computes from the same config changes, or what keys it, so older
# cached stages are not reused (2: images and augmentations drawn from (seed, step); 3: stage
# configs hold only the stage method's options, the pretraining stage is shared by every method).
STAGE_FORMAT = 3

PUBLISHED_STAGES = Path("published") / "stages"

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
    return scfg


def stage_identity(scfg: dict[str, Any], method_cls) -> dict[str, Any]:
    """The options of a stage's config that determine its weights (besides the data, the split
    and the stage before it, which its key names by hash)."""
    from bench.config import IDENTITY_EXCLUDED
    # a split file counts by its content (its sha256 is in the split's hash), not by its path
    ignored = IDENTITY_EXCLUDED | MECHANICS_KEYS | {"preset", "split_file"}
    if scfg.get("split_file"):
        ignored |= {"label_fraction"}  # the file's share, derived from it
    if not method_cls.uses_labeled:
        ignored |= SPLIT_KEYS  # a label-free stage sees every training image, whatever the split
    return {k: v for k, v in scfg.items() if k not in ignored}


def stage_key(scfg: dict[str, Any], method_cls, previous: str | None, dataset_hash: str, split_hash: str) -> str:
    """Hash of everything that determines a stage's weights."""
    blob = json.dumps({"config": stage_identity(scfg, method_cls), "previous": previous, "data": dataset_hash,
                       "split": split_hash if method_cls.uses_labeled else "", "format": STAGE_FORMAT},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def built_stage_configs(results_dir: Path) -> list[dict[str, Any]]:
    """The configs of the stages finished (final weights written) under `results_dir`, in its
    cache or kept with its published results."""
    root = Path(results_dir)
    infos = [*(root / "stages").glob("*/stage.json"), *(root / PUBLISHED_STAGES).glob("*/*/stage.json")]
    return [cfg for info in infos if (info.parent / "final.pt").is_file()
            and isinstance(cfg := read_json(info).get("config"), dict)]


def published_stage(results_dir: Path, key: str) -> Path | None:
    """The finished stage of this key kept with the published results, if any."""
    for final in sorted((Path(results_dir) / PUBLISHED_STAGES).glob(f"*/{key}/final.pt")):
        if (final.parent / "stage.json").is_file():
            return final.parent
    return None


def copy_stage(source: Path, stage_dir: Path) -> None:
    """A finished stage copied into the cache, its weights last: a copy cut short is not finished."""
    for name in ("stage.json", "metrics.json", "final.pt"):
        if (source / name).is_file():
            atomic_write(stage_dir / name, lambda tmp, name=name: shutil.copyfile(source / name, tmp))


def run_stage(stage_dir: Path, train: Callable[[Path], None], published: Path | None = None
              ) -> tuple[dict[str, Any], bool]:
    """Return the stage's final weights, training them with `train(stage_dir)` unless cached
    (or `published`, a finished copy of it, copied in). Returns (weights, reused). Across ranks,
    rank 0 holds the lock and decides; every rank trains (rank 0 writes) and then reads the
    same final weights."""
    main = world().is_main
    final = stage_dir / "final.pt"
    with contextlib.ExitStack() as stack:
        if main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            lock = stack.enter_context(open(stage_dir / ".lock", "w"))
            fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run needing this stage waits here
            if not final.exists() and published is not None:
                copy_stage(published, stage_dir)
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


def train_stages(prepared, record: RunHandle | None, link: StudyLink, on_validation=None):
    """Train (or reuse from the stage cache) the run's planned stages, in order; returns the last
    stage's weights, whether its classifier head carries over, per earlier stage its cache key,
    whether it was reused, the minutes it took to train (by this run or an earlier one) and its
    budget, and, for a method whose training is its last stage, that stage's result (else None)."""
    p_, cfg, method_cls, data, split = prepared, prepared.cfg, prepared.method_cls, prepared.data, prepared.split
    weights, keep_head, previous = None, False, None
    if p_.init is not None:  # a weight file stands in for MAE pretraining (the suite's own: with its head)
        init = p_.init
        weights, keep_head, previous = init[0], init[1].get("head_loaded", False), f"init:{init[1]['sha256']}"
    stages_info: dict[str, dict] = {}
    own = None
    for i, p in enumerate(p_.plan):
        is_own = not method_cls.own_training and i == len(p_.plan) - 1
        key = stage_key(p.cfg, p.method_cls, previous, data.source_hash, split.hash)
        stage_dir = Path(cfg["results_dir"]) / "stages" / key
        published = published_stage(cfg["results_dir"], key)
        job = StageJob(p, data, split, record, link, weights, keep_head, own=is_own, on_validation=on_validation,
                       progress=cfg["progress"], store=p_.runtime.get("store_used"))
        weights, reused = run_stage(stage_dir, job.train, published)
        keep_head, previous = p.stage.keep_head, key
        done = stage_result(stage_dir)
        if is_own:
            own = {**done, "stage_key": key, "reused": reused}
            if reused:
                job.replay(stage_dir)
            continue
        stages_info[p.stage.name] = {"key": key, "dir": str(stage_dir.resolve()), "reused": reused,
                                     "minutes": done.get("minutes", 0.0), "budget": done.get("budget", {})}
        if record is not None:
            record.set_info("stages", stages_info)
    return weights, keep_head, stages_info, own


class StageJob:
    """One stage's training for a run: a Trainer on the stage's config in the stage's folder,
    started from the previous stage's weights (or resumed from its own checkpoint), its curves
    logged into the run (prefixed by the stage's name, unless it is the run's own training) and
    kept in the stage's folder."""

    def __init__(self, planned: PlannedStage, data, split, record: RunHandle | None, link: StudyLink, prior,
                 keep_head: bool, own: bool, on_validation, progress: bool, store: str | None):
        self.p, self.data, self.split, self.record, self.link = planned, data, split, record, link
        self.prior, self.keep_head, self.own, self.store = prior, keep_head, own, store
        self.on_validation, self.progress = (on_validation if own else None), progress

    def train(self, stage_dir: Path) -> None:
        p = self.p
        ckpt = stage_dir / "checkpoint.pt"
        resume_step = checkpoint.saved_step(ckpt) if broadcast(ckpt.exists()) and world().is_main else None
        resume_step = broadcast(resume_step)
        sink = RecordSink(self.record, self.link, prefix="" if self.own else f"{p.stage.name}.",
                          curves=StageCurves(stage_dir, resume_step), stage="" if self.own else p.stage.name,
                          on_validation=self.on_validation, warns=self.own)
        trainer = Trainer(p.cfg, p.method_cls, self.data, self.split, stage_dir, sink=sink, store=self.store)
        if resume_step is not None:  # an interrupted stage continues where it stopped
            trainer.load_state_dict(checkpoint.load(trainer.ckpt_path))
        elif self.prior is not None:
            trainer.init_from(self.prior, self.keep_head)
        start = time.perf_counter()
        result = trainer.run(progress=self.progress)
        result["minutes"] = (time.perf_counter() - start) / 60
        if world().is_main:
            sink.flush()
            save_final(stage_dir, trainer.model, trainer.ema.model, p.cfg, result, trainer.init)
        if self.own and self.record is not None:
            self.record.set_info("init", trainer.init)
            self.keep_selected(stage_dir)

    def keep_selected(self, stage_dir: Path) -> None:
        """The run's own training is a stage: its validation-selected model also lives in the run."""
        if (stage_dir / "selected.pt").is_file():
            shutil.copyfile(stage_dir / "selected.pt", self.record.dir / "selected.pt")

    def replay(self, stage_dir: Path) -> None:
        """A reused stage that is the run's training: its curves and selected model become the run's."""
        if self.record is None:
            return
        for name, series in stage_curves(stage_dir).items():
            for step, value in zip(series["steps"], series["values"]):
                self.record.log_scalar(name, value, step)
        info = read_json(stage_dir / "stage.json").get("init")
        if info:
            self.record.set_info("init", info)
        self.keep_selected(stage_dir)
