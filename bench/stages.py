"""Multi-stage methods: earlier stages are content-addressed and reused.

A method declares `stages = (Stage("pretrain", "mae_pretrain", "pretrain_", inherits=...), ...)`.
Before the method's own training, each stage is trained with its own registered method on a
config made of the run's core options in the groups the stage inherits (data, split, model, run
mechanics; a fine-tuning stage also optimisation and views), the core defaults for the rest,
overridden by the run's options that carry the stage's prefix (`--pretrain-steps 800` -> the
stage's `steps`). MAE pretraining thus never picks up the fine-tuning recipe (layer decay,
smoothing, mixing). The stage's result is cached under `<results_dir>/stages/<hash>/`, keyed by
what the stage reads, so a sweep over fine-tuning knobs pretrains once and methods with the same
pretraining share one encoder. A stage killed mid-way resumes from its own checkpoint the next
time any run needs it; concurrent runs needing one stage wait for each other (file lock).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench import checkpoint
from bench.config import IDENTITY_EXCLUDED
from bench.distributed import barrier, broadcast, world
from bench.io import atomic_write_text

# Bumped when what a stage computes from the same config changes (2: images and augmentations
# drawn from (seed, step)), so older cached stages are not reused.
STAGE_FORMAT = 2
SPLIT_KEYS = {"label_fraction", "labels_per_class", "val_fraction", "unlabeled_pool", "split_file", "split_format",
              "val_from"}
MECHANICS_KEYS = {"eval_every", "ckpt_every", "log_every"}


@dataclass(frozen=True)
class Stage:
    name: str              # e.g. "pretrain"
    method: str            # registered method trained in this stage
    prefix: str            # run options "<prefix>key" set the stage's "key"
    keep_head: bool = False  # carry the classifier head into the next stage (False after MAE)
    # option groups (bench.config) taken from the run; the others start from the core defaults
    inherits: tuple[str, ...] = ("data", "split", "model", "optim", "views", "run")


def skipped(cfg: dict[str, Any], stage: Stage, method_cls) -> str | None:
    """Why a label-free pretraining stage does not run (published weights or no pretraining
    stand in for it), or None when it runs."""
    if method_cls.classifies:
        return None
    if cfg.get("init_from"):
        return f"--init-from {cfg['init_from']}"
    if cfg.get(f"{stage.prefix}steps") == 0:
        return f"--{stage.prefix.replace('_', '-')}steps 0: no pretraining"
    return None


def stage_config(cfg: dict[str, Any], stage: Stage, method_cls) -> dict[str, Any]:
    """The stage's resolved config: the run's core options of the groups the stage inherits
    (the stage method's defaults for the others, and for its own options) < the run's prefixed
    options."""
    from bench.config import CORE_OPTIONS, defaults
    base = defaults(method_cls)
    scfg = {k: cfg[k] if opt.group in stage.inherits else base[k] for k, opt in CORE_OPTIONS.items()}
    scfg.update({k: base[k] for k in method_cls.options})
    for key, value in cfg.items():
        if key.startswith(stage.prefix):
            name = key[len(stage.prefix):]
            options = {**CORE_OPTIONS, **method_cls.options}
            assert name in options, f"stage option {key} names no option of {method_cls.name}"
            if value is None:  # unset: the stage keeps the run's value
                continue
            scfg[name] = options[name].convert(name, value, flag=key)  # errors name the run's flag
    scfg["method"], scfg["preset"] = method_cls.name, cfg.get("preset")
    if cfg.get("store_used"):  # decided once per run: every stage reads the same store
        scfg["store_used"] = cfg["store_used"]
    return scfg


def stage_key(scfg: dict[str, Any], method_cls, previous: str | None, dataset_hash: str, split_hash: str) -> str:
    """Hash of everything that determines a stage's weights."""
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
    try:
        return json.loads((stage_dir / "stage.json").read_text())["result"]
    except (OSError, ValueError, KeyError):
        return {}


def transfer(state: dict[str, torch.Tensor], model: torch.nn.Module, keep_head: bool) -> None:
    """Load encoder (and, if `keep_head`, classifier) weights with an explicit key mapping:
    every encoder weight must load; only the head and decoder may differ between stages. A head
    that does not carry over is re-drawn as MAE and Semi-ViT fine-tune from a pretrained encoder:
    truncated normal with std 2e-5, zero bias, so the first steps do not disturb the encoder."""
    own = model.state_dict()
    take = {k: v for k, v in state.items() if k.startswith("vit.") and (keep_head or not k.startswith("vit.head"))}
    take.update({k: v for k, v in state.items() if k.startswith("mae_norm.") and k in own})
    missing = [k for k in own if k.startswith("vit.") and k not in take and not k.startswith("vit.head")]
    if missing:
        raise RuntimeError(f"stage weights lack encoder parameters {missing[:3]}")
    result = model.load_state_dict(take, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    head = model.vit.head
    if not keep_head and isinstance(head, torch.nn.Linear):
        with torch.no_grad():
            torch.nn.init.trunc_normal_(head.weight, std=2e-5)
            torch.nn.init.zeros_(head.bias)


def digest(state: dict[str, torch.Tensor], part: str = "encoder") -> str:
    """sha256 of the encoder tensors (or the classifier head's, `part="head"`) of a state dict:
    the run record names the weights a stage handed on, and a test can check they arrived."""
    h = hashlib.sha256()
    for k in sorted(state):
        if k.startswith("vit.") and k.startswith("vit.head") == (part == "head"):
            h.update(k.encode())
            h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
