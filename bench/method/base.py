"""The Method base class and the registry. A method writes only its train step.

The engine owns data, model, optimizer, schedule, EMA, evaluation, checkpoints and logging; a
method receives them at construction and returns `(loss, logs)` from `train_step`. Shared
mechanics are called from the core (`bench.method.views`, `bench.method.mixing`, `bench.method.pseudo`, the model's
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

from bench.data.batch import Batch, Images
from bench.distributed import all_sum, world
from bench.errors import UsageError
from bench.method.evaluate import Evaluation, evaluate
from bench.method.mixing import mix, one_hot_smooth, partners_of, sample_mix_params
from bench.options import PSEUDO, Option, positive, unit_closed
from bench.method.pseudo import PseudoLabelMode, PseudoLabels, require_reachable
from bench.method.thresholds import make_policy, threshold_options

REGISTRY: dict[str, type["Method"]] = {}


def register(name: str):
    """Class decorator: make a Method available as `bench run <name>`."""
    def wrap(cls: type[Method]) -> type[Method]:
        if not isinstance(name, str) or not name.isidentifier():
            raise UsageError(f"@register({name!r}): a method's name is a Python identifier, e.g. "
                             f"@register(\"mean_teacher\")")
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise UsageError(f"method '{name}' is already registered ({REGISTRY[name].__module__}); "
                             f"register yours under another name")
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return wrap


_ENTRY_POINTS_LOADED = False


def method_names() -> list[str]:
    """Every registered method: the shipped ones (importing `methods` registers them), installed
    packages' (entry points, bench.method.plugins) and those of `--plugin` files already loaded."""
    global _ENTRY_POINTS_LOADED
    importlib.import_module("methods")
    if not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED = True
        from bench.method.plugins import load_entry_points
        load_entry_points()
    return sorted(REGISTRY)


def get_method(name: str) -> type["Method"]:
    names = method_names()
    if name not in REGISTRY:
        raise UsageError(f"unknown method '{name}'; use one of {', '.join(names)}")
    return REGISTRY[name]


@dataclass(frozen=True)
class Pass:
    """One model pass of a training step over `images` images (the global batch), for the
    plan's cost estimate: trained (forward and backward) or forward only (a teacher); an MAE pass
    encodes the visible patches and decodes all of them."""
    images: int
    trained: bool = True
    mask_ratio: float | None = None


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

    @property
    def size(self) -> int:
        """Training images (N): what per-image state (a pseudo-label memory) is indexed by."""
        return len(self.y)

    @property
    def device(self) -> torch.device:
        return self.y.device


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
    threshold_option: ClassVar[str | None] = None  # the option holding its confidence threshold, if it has one
    strict_threshold: ClassVar[bool] = False  # admit above the threshold only (SSMAE), not at it
    stages: ClassVar[tuple] = ()             # earlier stages (bench.method.stage.Stage), trained first
    own_training: ClassVar[bool] = True      # False: the run's training is its last stage (cached, shared)
    plugin: ClassVar[dict | None] = None     # where a user's method came from (bench.method.plugins)

    def __init__(self, cfg: dict[str, Any], model, ema, views, num_classes: int, data: TrainData,
                 autocast=contextlib.nullcontext, pl_mode: PseudoLabelMode | None = None):
        self.cfg = cfg
        self.autocast = autocast
        self.model = model
        self.ema = ema
        self.views = views
        self.num_classes = num_classes
        self.data = data
        self.random = views.random  # the run's StepRandom: every draw derives from (seed, step)
        self._pseudo: dict[str, PseudoLabels] = {}
        self.pl_mode = pl_mode or PseudoLabelMode()
        self.policy = None
        if self.threshold_option is not None:  # the threshold policy: fixed, or adapting to the teacher
            self.policy = make_policy(cfg, cfg[self.threshold_option], num_classes, data.device, pool=data.unlabeled,
                                      index_space=data.size, strict=self.strict_threshold)
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
        written, for every run and every study cell; `split` is the run's `bench.data.splits.Split`."""
        if cls.uses_unlabeled and cls.unlabeled_source == "pool" and len(split.unlabeled) == 0:
            raise UsageError(f"{cls.name}: the unlabeled pool is empty (--unlabeled-pool "
                             f"{cfg['unlabeled_pool']}, --label-fraction {cfg['label_fraction']}); "
                             f"use --unlabeled-pool all or a smaller labeled budget")
        if cls.uses_unlabeled and "mu" in cfg and round(cfg["mu"] * cfg["batch_size"]) < 1:
            raise UsageError(f"{cls.name}: --mu {cfg['mu']} x --batch-size {cfg['batch_size']} rounds to no "
                             f"unlabeled image per step; raise --mu or --batch-size")
        if cfg.get("pl_mode", "on") != "on" and not cls.pseudo_labels:
            raise UsageError(f"{cls.name}: --pl-mode {cfg['pl_mode']} switches pseudo-labels, and {cls.name} has "
                             f"none; use it with a semi-supervised method or drop it")
        # a threshold that adapts from 1/K (freematch) or weights instead of cutting (softmatch)
        # reads no fixed threshold; the others can never admit above the cap smoothing sets
        if cls.threshold_option and cfg.get("threshold_policy", "fixed") in ("fixed", "align", "flexmatch"):
            require_reachable(cls.name, cfg, num_classes, cls.threshold_option, strict=cls.strict_threshold)

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

    @classmethod
    def ema_from_stage(cls, cfg: dict[str, Any]) -> bool:
        """Whether the EMA model (a teacher) starts from the previous stage's EMA rather than as
        a copy of the model the run starts from."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def full_state_dict(self) -> dict[str, Any]:
        """The method's state with its threshold policy's statistics (the engine checkpoints it)."""
        out = dict(self.state_dict())
        if self.policy is not None and self.policy.state():
            out["threshold_policy"] = self.policy.state_dict()
        return out

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if self.policy is not None and self.policy.state():
            self.policy.load_state_dict(state.pop("threshold_policy"))
        self.load_state_dict(state)

    @classmethod
    def step_passes(cls, cfg: dict[str, Any]) -> list[Pass]:
        """The model passes of one training step (`bench study --plan` turns them into FLOPs):
        by default the labeled batch trained; for a pseudo-labelling method the unlabeled batch
        through the teacher and trained; for a method that reconstructs, an MAE pass of it."""
        labeled = cfg["batch_size"] if cls.uses_labeled else 0
        unlabeled = cls.unlabeled_batch_size(cfg)
        out = [Pass(labeled)] if labeled else []
        if unlabeled and cls.pseudo_labels:
            out += [Pass(unlabeled, trained=False), Pass(unlabeled)]
        if cls.uses_decoder:
            out.append(Pass(unlabeled or labeled, mask_ratio=cfg["mask_ratio"]))
        return out

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

    def pseudo_label(self, probs: Tensor, idx: Tensor, name: str = "pl") -> PseudoLabels:
        """Pseudo-labels of the step's unlabeled images from the teacher's probabilities `probs`
        (rows as in `batch.u`, training-set indices `idx`): the threshold policy decides and
        updates; the decision is logged as `<name>_*`; what trains is what the engine's
        `--pl-mode` lets through (all of it; nothing, for the method's control; the true labels
        under the same mask, for an oracle)."""
        pl = self.policy(probs, idx)
        self.log_pseudo_labels(pl, name)
        return self.pl_mode(pl)

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
        """FixMatch's unlabeled loss on views `x`: `pseudo_label_ce` of the model's logits."""
        return self.pseudo_label_ce(self.model(x), pl)

    @staticmethod
    def pseudo_label_ce(logits: Tensor, pl: PseudoLabels) -> Tensor:
        """CE on the admitted images' hard labels, each at its weight (1 admitted, 0 not, or
        SoftMatch's), averaged over ALL the unlabeled images, so its weight grows with the
        admission rate."""
        per_sample = F.cross_entropy(logits.float(), pl.labels, reduction="none")
        return weighted_mean(per_sample * pl.weights)

    def reconstruction_loss(self, x: Tensor, images: Images, mask_ratio: float) -> Tensor:
        """MAE loss of views `x` of `images`, each masked by noise drawn for its own row."""
        noise = self.random.on(images).uniform(self.model.num_patches)
        loss, _, _ = self.model.forward_mae(x, mask_ratio, noise)
        return loss


def pseudo_label_options(tau: float, mu: float, lambda_u: float, teacher: str, policy: str = "fixed"
                         ) -> dict[str, Option]:
    """The knobs every method with a FixMatch-style unlabeled term shares: its threshold, the
    unlabeled batch, the term's weight, the teacher and the threshold policy."""
    return {
        "tau": Option(tau, "confidence threshold for admitting a pseudo-label (freematch and softmatch policies "
                      "adapt their own)", group=PSEUDO, **unit_closed()),
        "mu": Option(mu, "unlabeled images per labeled image in a step", type=float, **positive()),
        "lambda_u": Option(lambda_u, "weight of the unlabeled loss", type=float, check=lambda v: v >= 0,
                           check_msg=">= 0"),
        "teacher": Option(teacher, "pseudo-label source: the online model or its EMA", choices=("online", "ema")),
        **threshold_options(policy),
    }


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
