"""The Method base class and the registry. A method writes only its train step.

The engine owns data, model, optimizer, schedule, EMA, evaluation, checkpoints and logging; a
method receives them at construction and returns `(loss, logs)` from `train_step`. Shared
mechanics are called from the core (`bench.views`, `bench.mixing`, `bench.pseudo`, the model's
masking), never re-written in a method file.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.errors import UsageError
from bench.evaluate import Evaluation, evaluate
from bench.mixing import mix, one_hot_smooth, sample_mix_params
from bench.options import Option

REGISTRY: dict[str, type["Method"]] = {}


def register(name: str):
    """Class decorator: make a Method available as `bench run <name>`."""
    def wrap(cls: type[Method]) -> type[Method]:
        assert name not in REGISTRY, f"method {name} registered twice"
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return wrap


def method_names() -> list[str]:
    importlib.import_module("methods")  # importing the package registers every method
    return sorted(REGISTRY)


def get_method(name: str) -> type["Method"]:
    names = method_names()
    if name not in REGISTRY:
        raise UsageError(f"unknown method '{name}'; use one of {', '.join(names)}")
    return REGISTRY[name]


@dataclass
class TrainData:
    """What a method may see of the data: training images and the split, never the test set."""
    x: Tensor                   # (N, H, W, 3) uint8, on the device
    y: Tensor                   # (N,) true labels (unlabeled pool's: for precision logging only)
    labeled: Tensor             # labeled-train indices
    val: Tensor                 # validation indices
    unlabeled: Tensor           # unlabeled pool indices


@dataclass
class Batch:
    """One step's data, uint8 images on the device; views are made by the method."""
    x_l: Tensor | None = None   # (B, H, W, 3) labeled-train images
    y_l: Tensor | None = None   # (B,)
    x_u: Tensor | None = None   # (muB, H, W, 3) unlabeled images
    idx_u: Tensor | None = None  # their indices in the training set (pseudo-label memory keys)
    y_u: Tensor | None = None   # their true labels: for logging pseudo-label precision only


class Method:
    name: ClassVar[str] = "?"
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    recipe: ClassVar[dict[str, Any]] = {}    # the method's own values of core options (its paper's)
    uses_labeled: ClassVar[bool] = True      # sample a labeled batch each step
    uses_unlabeled: ClassVar[bool] = False   # sample unlabeled_batch_size() unlabeled images
    unlabeled_source: ClassVar[str] = "pool"  # "pool" (the split's) or "all" training images
    uses_decoder: ClassVar[bool] = False     # build the MAE decoder
    classifies: ClassVar[bool] = True        # evaluate accuracy (False for label-free pretraining)
    pseudo_labels: ClassVar[bool] = False    # admits pseudo-labels: logs pl_rate / pl_precision
    stages: ClassVar[tuple] = ()             # earlier stages (bench.stages.Stage), trained first

    def __init__(self, cfg: dict[str, Any], model, ema, views, num_classes: int, data: TrainData,
                 autocast=contextlib.nullcontext):
        self.cfg = cfg
        self.autocast = autocast
        self.model = model
        self.ema = ema
        self.views = views
        self.num_classes = num_classes
        self.data = data
        self.generator: torch.Generator = views.generator  # the run's seeded device generator
        self.setup()

    # -- what a method implements -------------------------------------------------------------
    def setup(self) -> None:
        """Build state beyond the shared model (teachers, memories, gates)."""

    def train_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def on_validation(self, val: dict[str, Evaluation], step: int) -> dict[str, float] | None:
        """Called after each evaluation with the VALIDATION results of the raw and EMA models
        (`val["raw"]`, `val["ema"]`); the test set never reaches a method. Returned values are
        logged at this step."""

    @classmethod
    def check(cls, cfg: dict[str, Any], num_classes: int, split) -> None:
        """Reject (UsageError) a resolved config under which the method cannot do what it is
        named for, e.g. pseudo-labelling that can never admit a label. Runs before anything is
        written, for every run and every study cell; `split` is the run's `bench.splits.Split`."""
        if cls.uses_unlabeled and cls.unlabeled_source == "pool" and len(split.unlabeled) == 0:
            raise UsageError(f"{cls.name}: the unlabeled pool is empty (--unlabeled-pool "
                             f"{cfg['unlabeled_pool']}, --label-fraction {cfg['label_fraction']}); "
                             f"use --unlabeled-pool all or a smaller labeled budget")
        if cls.uses_unlabeled and "mu" in cfg and round(cfg["mu"] * cfg["batch_size"]) < 1:
            raise UsageError(f"{cls.name}: --mu {cfg['mu']} x --batch-size {cfg['batch_size']} rounds to no "
                             f"unlabeled image per step; raise --mu or --batch-size")

    def validation_every(self) -> int | None:
        """Steps between extra validation-only readings (e.g. a gate decided more often than the
        test set is evaluated); None: validation is read at the evaluations only."""
        return None

    def status(self) -> dict[str, str]:
        """Short state for the progress bar (e.g. the gate), read at log intervals."""
        return {}

    def steady_state(self) -> None:
        """Enter the regime that dominates a long run (e.g. an open gate), so that `bench speed`
        times the full step rather than a warm-up shortcut."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def unlabeled_batch_size(self) -> int:
        return int(round(self.cfg.get("mu", 0) * self.cfg["batch_size"])) if self.uses_unlabeled else 0

    # -- shared helpers ------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_probs(self, x: Tensor, teacher: str = "online") -> Tensor:
        """Softmax of the online model or the EMA teacher on ready views, in eval mode (no
        stochastic depth) and without gradient: pseudo-labels are targets, not paths."""
        model = self.ema.model if teacher == "ema" else self.model
        was_training = model.training
        model.eval()
        probs = model(x).float().softmax(dim=1)
        model.train(was_training)
        return probs

    def evaluate_indices(self, idx: Tensor) -> Evaluation:
        """Evaluate the online model on training images `idx` (e.g. the labeled-train split)."""
        return evaluate(self.model, self.data.x[idx], self.data.y[idx], self.views.eval,
                        self.cfg["eval_batch_size"], self.autocast)

    def supervised_loss(self, x_l: Tensor, y_l: Tensor) -> Tensor:
        """Cross-entropy on the labeled batch: configured view, optional mixup/cutmix, smoothing."""
        cfg = self.cfg
        x = self.views.labeled(x_l, cfg["labeled_view"])
        targets = one_hot_smooth(y_l, self.num_classes, cfg["label_smoothing"])
        if cfg["mixup_alpha"] > 0 or cfg["cutmix_alpha"] > 0:
            lam, perm, use_cutmix = sample_mix_params(x.shape[0], cfg["mixup_alpha"], cfg["cutmix_alpha"],
                                                      0.5, self.generator, x.device)
            x, targets, _ = mix(x, targets, lam, perm, use_cutmix, self.generator)
        return soft_cross_entropy(self.model(x), targets)


def soft_cross_entropy(logits: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean over the batch of -sum(t * log p); per-sample `weights` (e.g. a confidence mask)."""
    per_sample = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
