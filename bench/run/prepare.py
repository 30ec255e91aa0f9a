"""Everything that can reject a run, before anything is written: the config against the world,
the device, the resume target, the data, the split and what the method and each of its stages
need of it, the model; and the run's plan of stages and runtime facts, computed once here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.config import differing_keys
from bench.data.sources import load_for, prepare_cache_dir
from bench.data.split_files import check_budget, read_split_file
from bench.data.splits import split_for
from bench.distributed import pick_device, world
from bench.errors import UsageError
from bench.method.base import get_method
from bench.model.pretrained import load_into
from bench.model.vit_mae import build_model
from bench.run.stages import PlannedStage, plan
from bench.run.tracking import mongo_observer, runs_dir
from bench.train import checkpoint


def find_run_dir(results_dir: str | Path, run: str) -> Path:
    """A run given as an id under <results_dir>/runs or as a path to its directory."""
    candidates = [runs_dir(results_dir) / run, Path(run)]
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    raise UsageError(f"--resume {run}: no run directory with a config.json at "
                     f"{' or '.join(map(str, candidates))}; give a run id or path")


def check_feasible(cfg: dict[str, Any], data, cache_dir: Path, planned: list[PlannedStage] | None = None):
    """The run's split, once the method and each of its earlier stages have confirmed that the
    config lets them work (e.g. that a pseudo-label can be admitted at all, that a stage has
    steps to run); UsageError otherwise."""
    labeled_from, info = None, None
    if cfg.get("split_file"):
        labeled_from, info = read_split_file(cfg["split_file"], data.train_files, data.train_y, data.classes,
                                             cfg["split_format"], data.folds)
        share = check_budget(info, len(data.labeled_pool), cfg["label_fraction"], cfg["labels_per_class"])
        if cfg["label_fraction"] is None:
            cfg["label_fraction"] = share  # the recorded budget is the file's
    if cfg.get("pl_mode") == "oracle" and data.unlabeled_only:
        raise UsageError(f"--pl-mode oracle needs the true label of every pool image, and {data.unlabeled_only:,} "
                         f"have none (unlabeled-only images); run the oracle without them")
    split = split_for(cfg, data.train_y, data.num_classes, data.source_hash, cache_dir, labeled_from, info)
    method_cls = get_method(cfg["method"])
    method_cls.check(cfg, data.num_classes, split)
    for p in planned if planned is not None else plan(cfg, method_cls):  # as each stage reads its options
        p.method_cls.check(p.cfg, data.num_classes, split)
    return split


def check_resumable(cfg: dict[str, Any], run_dir: Path) -> int:
    """The checkpoint step to resume `run_dir` from; UsageError when it cannot be resumed."""
    stored = json.loads((run_dir / "config.json").read_text())
    diff = differing_keys(cfg, stored)
    if diff:
        shown = ", ".join(f"{k}={stored.get(k)!r} (now {cfg.get(k)!r})" for k in diff[:4])
        raise UsageError(f"cannot resume run {run_dir.name}: its config differs in {shown}; "
                         f"pass the original options or start a new run")
    status = json.loads((run_dir / "run.json").read_text()).get("status") if (run_dir / "run.json").exists() else None
    if status == "COMPLETED":
        raise UsageError(f"run {run_dir.name} already COMPLETED; start a new run instead of --resume")
    if not get_method(cfg["method"]).own_training:
        return 0  # its training is a stage, which resumes from its own checkpoint
    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.is_file():
        raise UsageError(f"run {run_dir.name} has no checkpoint to resume from; start it anew")
    return checkpoint.saved_step(ckpt)


def check_world(cfg: dict[str, Any], world_size: int, planned: list[PlannedStage] | None = None) -> None:
    """Every per-step count of the run and its stages must split evenly over the ranks: each rank
    computes an equal slice of the global batch."""
    if world_size <= 1:
        return
    method_cls = get_method(cfg["method"])
    counts = step_counts(cfg, method_cls, "")
    for p in planned if planned is not None else plan(cfg, method_cls):
        counts += step_counts(p.cfg, p.method_cls, p.stage.prefix)
    for name, n in counts:
        if n % world_size:
            raise UsageError(f"{name} gives {n} images per step, which {world_size} ranks cannot share equally "
                             f"(the batch is global); make it a multiple of {world_size}")


def check_store(cfg: dict[str, Any], data) -> str:
    """The store the run's images will live in (recorded with the run); a streamed store needs
    the on-disk cache that ImageNet and `--image-side` build."""
    import numpy as np
    from bench.data.store import choose
    return choose(cfg["store"], data.train_x.nbytes + data.test_x.nbytes, pick_device(cfg["device"]),
                  isinstance(data.train_x, np.memmap))


def step_counts(cfg: dict[str, Any], method_cls, prefix: str) -> list[tuple[str, int]]:
    """(the options behind it, images) for the labeled and unlabeled parts of a step."""
    flag = f"--{prefix.replace('_', '-')}batch-size"
    out = [(flag, cfg["batch_size"])] if method_cls.uses_labeled else []
    if method_cls.uses_unlabeled:
        name = f"--{prefix.replace('_', '-')}mu x {flag}" if "mu" in cfg else flag
        out.append((name, method_cls.unlabeled_batch_size(cfg)))
    return out


@dataclass
class Prepared:
    """A run's inputs once every check has passed (nothing written yet)."""
    cfg: dict[str, Any]
    method_cls: type
    data: Any
    split: Any
    resume_at: tuple[str, int] | None
    observers: list
    plan: list[PlannedStage] = field(default_factory=list)  # the earlier stages, computed once
    # runtime facts, beside the config (not in it: they change nothing a run computes): the store
    # the images live in, and on several ranks the world size and each rank's share of a step
    runtime: dict[str, Any] = field(default_factory=dict)
    init: tuple[dict, dict] | None = None  # --init-from: (weights, what was loaded)


def initial_weights(cfg: dict[str, Any], num_classes: int) -> tuple[dict, dict]:
    """`--init-from`'s encoder in a model of the run's architecture (strict: every encoder tensor
    from the file), as stage weights; and what was loaded, for the run record."""
    model = build_model(cfg, num_classes, with_decoder=True)
    info = load_into(cfg["init_from"], model)
    # only what came from the file travels on (an MAE or timm file's decoder is not read)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("decoder.") or "decoder" in info.get("loaded", [])}
    return {"model": state, "ema": state}, info


def prepare(cfg: dict[str, Any], resume: str | None, world_size: int) -> Prepared:
    """Everything that can reject a run, before anything is written: the world's batch split,
    the device, the resume target, Mongo, the data, the split and what the method needs of it,
    the model. `bench run --nproc` calls it before it starts any rank."""
    method_cls = get_method(cfg["method"])
    planned = plan(cfg, method_cls)
    check_world(cfg, world_size, planned)
    pick_device(cfg["device"])
    # Cheap checks first, then the data (which may download and decode), then the model.
    resume_at = None
    if resume is not None:
        run_dir = find_run_dir(cfg["results_dir"], resume)
        resume_at = (run_dir.name, check_resumable(cfg, run_dir))
        cfg = {**cfg, "results_dir": str(run_dir.parent.parent)}
    observers = [mongo_observer(cfg["mongo"])] if cfg["mongo"] and world().is_main else []
    cache_dir = prepare_cache_dir(cfg["cache_dir"])
    data = load_for(cfg, cache_dir, progress=cfg["progress"] and world().is_main)
    split = check_feasible(cfg, data, cache_dir, planned)
    if split.key.get("split_file") and world().is_main:
        f = split.key["split_file"]
        print(f"split file {cfg['split_file']} ({f['format']}): {f['images']} labeled images, {f['per_class_min']}-"
              f"{f['per_class_max']} per class in {f['classes_with_labels']} classes; validation from the "
              f"{cfg['val_from']} images", flush=True)
    runtime: dict[str, Any] = {"store_used": check_store(cfg, data)}
    with torch.device("meta"):  # a model the options cannot build is rejected before any write
        build_model(cfg, data.num_classes, with_decoder=method_cls.uses_decoder)
    init = initial_weights(cfg, data.num_classes) if cfg.get("init_from") else None
    if world_size > 1:  # what each rank computes of the global batch, recorded with the run
        runtime.update(world_size=world_size,
                       rank_batch={"labeled": (cfg["batch_size"] if method_cls.uses_labeled else 0) // world_size,
                                   "unlabeled": method_cls.unlabeled_batch_size(cfg) // world_size})
    return Prepared(cfg, method_cls, data, split, resume_at, observers, planned, runtime, init)


