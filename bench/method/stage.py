"""Earlier stages as a method declares them: the kit's part of multi-stage training.

A `Stage` names the registered method it trains, the option groups it takes from the run (the
rest start from that method's defaults) and the options a run may set for it, `--<prefix><name>`
(`--pretrain-steps 800` -> the stage's `steps`), generated here from the core's own declarations
(type, range, help), so a stage never restates them. Every classifying method may start from the
MAE pretraining stage, `PRETRAIN` (`--start mae`). How a run plans, keys, caches and trains its
stages is `bench.run.stages`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.options import DATA, MODEL, OPTIM, RUN, SPLIT, VIEWS, Option

EVERY_GROUP = (DATA, SPLIT, MODEL, OPTIM, VIEWS, RUN)  # a fine-tune: everything but the start and pseudo-labels


@dataclass(frozen=True)
class Stage:
    name: str                 # e.g. "pretrain"
    method: str               # registered method trained in this stage
    prefix: str               # run options "<prefix>key" set the stage's "key"; "" = the run's own options
    inherits: tuple[str, ...] = EVERY_GROUP  # option groups taken from the run; the others: the stage method's defaults
    # options a run may set for this stage, with the stage's default (None: the run's value)
    settable: dict[str, Any] = field(default_factory=dict)
    keep_head: bool = False   # carry the classifier head into the next stage (False after MAE)
    about: str = ""           # how the generated options' help names the stage


# MAE pretraining takes data, split, architecture and run mechanics from the run, never its
# fine-tuning recipe (no layer decay, smoothing or mixing); the official recipe scaled to CIFAR.
PRETRAIN = Stage("pretrain", "mae_pretrain", "pretrain_", inherits=(DATA, SPLIT, MODEL, RUN),
                 settable={"steps": 5000, "batch_size": 256, "lr": 1.5e-4, "warmup_steps": 250,
                           "weight_decay": 0.05, "beta2": 0.95, "drop_path": 0.0, "mask_ratio": 0.75},
                 about="MAE pretraining")


def stage_options(stage: Stage, core: dict[str, Option], own: dict[str, Option]) -> dict[str, Option]:
    """The run options that set `stage`'s knobs, generated from the declarations of the core
    option (`core`) or stage-method option (`own`) each one sets."""
    out = {}
    for name, default in stage.settable.items():
        base = core.get(name) or own[name]
        unset = "" if default is not None else " (unset: the run's)"
        out[stage.prefix + name] = Option(default, f"{stage.about}: {base.help}{unset}", type=base.kind,
                                          choices=base.choices, check=base.check, check_msg=base.check_msg,
                                          group=stage.name)
    return out


def starts_from_mae(cfg: dict[str, Any], method_cls) -> bool:
    """Whether the run trains (or reuses) the MAE pretraining stage: `--start mae`, for a
    classifying method, unless `--init-from` stands in for it."""
    return cfg.get("start") == "mae" and method_cls.classifies and not cfg.get("init_from")


def stages_of(cfg: dict[str, Any], method_cls) -> list[Stage]:
    """The stages a run of `method_cls` trains before its own training, in order."""
    return ([PRETRAIN] if starts_from_mae(cfg, method_cls) else []) + list(method_cls.stages)


def describe_start(cfg: dict[str, Any], method_cls) -> str:
    """Where a run's weights start, in words: "scratch", "MAE 6000 steps", "MAE 6000 steps ->
    finetune 2000 steps" (its earlier stages, not the run's own training), "file NAME"."""
    if cfg.get("init_from"):
        parts = [f"file {Path(cfg['init_from']).name}"]
    elif starts_from_mae(cfg, method_cls):
        parts = [f"MAE {cfg.get('pretrain_steps')} steps"]
    else:
        parts = ["scratch"]
    earlier = method_cls.stages if method_cls.own_training else method_cls.stages[:-1]
    parts += [f"{s.name} {cfg.get(s.prefix + 'steps') or cfg.get('steps')} steps" for s in earlier]
    return " -> ".join(parts)
