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

from bench.batch import Batch, Images
from bench.distributed import all_sum, world
from bench.errors import UsageError
from bench.evaluate import Evaluation, evaluate
from bench.mixing import mix, one_hot_smooth, partners_of, sample_mix_params
from bench.options import Option
from bench.pseudo import PseudoLabels

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
    """What a method may see of the data: training images and the labels of its labeled and
    validation splits. The unlabeled pool's labels read -1 (the engine alone holds them, to
    measure pseudo-label precision) and the test set is not here at all."""
    x: Any                      # the training images' store: x.gather(idx) -> (n, H, W, 3) uint8 on the device
    y: Tensor                   # (N,) labels of the labeled and validation images, -1 elsewhere
    labeled: Tensor             # labeled-train indices
    val: Tensor                 # validation indices
    unlabeled: Tensor           # unlabeled pool indices


class Method:
    name: ClassVar[str] = "?"
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    recipe: ClassVar[dict[str, Any]] = {}    # the method's own values of core options (its paper's)
    uses_labeled: ClassVar[bool] = True      # sample a labeled batch each step
    uses_unlabeled: ClassVar[bool] = False   # sample unlabeled_batch_size(cfg) unlabeled images
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
        self.random = views.random  # the run's StepRandom: every draw derives from (seed, step)
        self._pseudo: dict[str, PseudoLabels] = {}
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

    @classmethod
    def unlabeled_batch_size(cls, cfg: dict[str, Any]) -> int:
        """Unlabeled images per step over the whole (global) batch."""
        return int(round(cfg.get("mu", 0) * cfg["batch_size"])) if cls.uses_unlabeled else 0

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

    def log_pseudo_labels(self, pl: PseudoLabels, name: str = "pl") -> None:
        """Report this step's pseudo-labels for the unlabeled batch (`mask`: the images they
        train); the engine logs `<name>_rate`, `<name>_conf` and, against the pool's true labels
        that only it holds, `<name>_precision`."""
        self._pseudo[name] = pl

    def take_pseudo_labels(self) -> dict[str, PseudoLabels]:
        """The step's reported pseudo-labels (for the engine), cleared for the next step."""
        out, self._pseudo = self._pseudo, {}
        return out

    def evaluate_indices(self, idx: Tensor) -> Evaluation:
        """Evaluate the online model on training images `idx` of the labeled or validation split."""
        return evaluate(self.model, self.data.x, idx, self.data.y[idx], self.views.eval,
                        self.cfg["eval_batch_size"], self.autocast)

    def supervised_loss(self, images: Images, y_l: Tensor) -> Tensor:
        """Cross-entropy on the labeled batch: configured view, optional mixup/cutmix, smoothing."""
        cfg = self.cfg
        x = self.views.labeled(images, cfg["labeled_view"])
        targets = one_hot_smooth(y_l, self.num_classes, cfg["label_smoothing"])
        if cfg["mixup_alpha"] > 0 or cfg["cutmix_alpha"] > 0:
            draws = self.random.on(images)
            lam, perm, use_cutmix = sample_mix_params(draws, cfg["mixup_alpha"], cfg["cutmix_alpha"], 0.5,
                                                      self.random.host)
            x, targets, _ = mix(x, targets, lam, partners_of(x, perm, images), partners_of(targets, perm, images),
                                use_cutmix, draws)
        return soft_cross_entropy(self.model(x), targets)

    def hard_pseudo_label_loss(self, x: Tensor, pl: PseudoLabels) -> Tensor:
        """FixMatch's unlabeled loss: CE on the admitted images' hard labels, averaged over ALL
        the unlabeled images (admitted or not), so its weight grows with the admission rate."""
        per_sample = F.cross_entropy(self.model(x).float(), pl.labels, reduction="none")
        return weighted_mean(per_sample * pl.mask.float())

    def reconstruction_loss(self, x: Tensor, images: Images, mask_ratio: float) -> Tensor:
        """MAE loss of views `x` of `images`, each masked by noise drawn for its own row."""
        noise = self.random.on(images).uniform(self.model.num_patches)
        loss, _, _ = self.model.forward_mae(x, mask_ratio, noise)
        return loss


def weighted_mean(values: Tensor, weights: Tensor | None = None) -> Tensor:
    """sum(w * v) / sum(w) over the step's images, on every rank over the GLOBAL batch: the
    denominator is summed over ranks (and the rank's share scaled up, since gradients are
    averaged over ranks), so the loss is the same at any world size. Without weights, a plain
    mean (equal slices: the mean of the ranks' means is the global mean). 0 when the weights
    sum to 0. The one place a loss divides by a count of images."""
    if weights is None:
        return values.mean()
    total = all_sum(weights.detach().sum())
    return (values * weights).sum() * world().size / total.clamp_min(1e-12)


def soft_cross_entropy(logits: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean over the batch of -sum(t * log p); per-sample `weights` (e.g. a confidence mask)."""
    per_sample = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
