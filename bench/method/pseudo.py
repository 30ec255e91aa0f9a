"""Pseudo-labelling mechanics shared by every semi-supervised method.

Thresholding, a per-image pseudo-label memory and SSMAE-style validation gate live here, once.
Precision against the pool's true labels is measured by the engine, which alone holds them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bench.distributed import all_cat
from bench.errors import UsageError
from bench.method.evaluate import Evaluation


@dataclass
class PseudoLabels:
    labels: Tensor       # (N,) argmax class
    conf: Tensor | None  # (N,) max probability (None: labels recalled from a memory)
    mask: Tensor         # (N,) bool, admitted
    weight: Tensor | None = None  # (N,) soft weights (SoftMatch); None: the mask's 0 / 1

    @property
    def weights(self) -> Tensor:
        """Each image's weight in the unlabeled loss: its soft weight, else 1 if admitted."""
        return self.weight if self.weight is not None else self.mask.float()


PL_MODES = ("on", "off", "oracle")


class PseudoLabelMode:
    """The engine's switch on what a method's pseudo-labels train (`--pl-mode`): `on`, as
    admitted; `off`, nothing (the method's control: the same run, same random numbers, its
    unlabeled term switched off); `oracle`, the true labels under the method's own admission
    mask (a diagnostic ceiling, never a default). The method never reads the truth: the engine
    hands it to this switch, for the unlabeled batch of the step, in oracle runs only."""

    def __init__(self, mode: str = "on"):
        assert mode in PL_MODES, mode
        self.mode = mode
        self._truth: Tensor | None = None

    def begin_step(self, y_unlabeled: Tensor | None) -> None:
        """The engine's call before a step: the unlabeled batch's true labels, kept for an oracle."""
        self._truth = y_unlabeled if self.mode == "oracle" else None

    def __call__(self, pl: PseudoLabels) -> PseudoLabels:
        """The pseudo-labels of the step's unlabeled batch (rows as in the batch) that train."""
        if self.mode == "on":
            return pl
        if self.mode == "off":
            none = torch.zeros_like(pl.mask)
            return PseudoLabels(pl.labels, pl.conf, none, None if pl.weight is None else torch.zeros_like(pl.weight))
        return PseudoLabels(self._truth.to(pl.labels.device), pl.conf, pl.mask, pl.weight)


@torch.no_grad()
def threshold(probs: Tensor, tau: float, strict: bool = False) -> PseudoLabels:
    """Hard pseudo-labels; admitted where confidence >= tau (FixMatch) or > tau (`strict`, SSMAE)."""
    conf, labels = probs.float().max(dim=1)
    mask = conf > tau if strict else conf >= tau
    return PseudoLabels(labels, conf, mask)


def confidence_cap(label_smoothing: float, num_classes: int) -> float:
    """The largest probability a model trained on smoothed targets is pushed towards: the
    smoothed target itself, 1 - s + s / K. A threshold at or above it admits (almost) nothing."""
    return 1.0 - label_smoothing + label_smoothing / num_classes


def require_reachable(method: str, cfg: dict, num_classes: int, option: str, strict: bool = False) -> None:
    """Bad input when label smoothing caps confidence at or below the admission threshold
    cfg[option] (`strict`: admitted above it, as in `threshold`): such a run could never admit a
    pseudo-label, nor open a gate reading it."""
    s, t = cfg["label_smoothing"], cfg[option]
    cap = confidence_cap(s, num_classes)
    if cap < t or ((strict or s > 0) and cap <= t):  # a smoothed target is approached, never reached
        flag = "--" + option.replace("_", "-")
        fix = f"lower --label-smoothing below {(1 - t) / (1 - 1 / num_classes):.4f} or " if t < 1 else ""
        raise UsageError(f"{method}: --label-smoothing {s} caps confidence at {cap:.3f} on {num_classes} classes, "
                         f"not above {flag} {t}, so no pseudo-label can be admitted; {fix}lower {flag} "
                         f"below {cap:.3f}")


def agreeing(weak: PseudoLabels, strong: PseudoLabels) -> PseudoLabels:
    """SSMAE's admission filter: confident on both views and the same class on both."""
    mask = weak.mask & strong.mask & (weak.labels == strong.labels)
    return PseudoLabels(weak.labels, weak.conf, mask)


def admission_logs(pl: PseudoLabels, y_true: Tensor, name: str = "pl", partial: bool = False) -> dict[str, Tensor]:
    """Admission rate, mean confidence and precision of admitted labels against `y_true`, each
    as a (numerator, denominator) pair of this step's counts (no host sync), so a log window
    divides sums over the steps it saw: a rate logged only while a gate is open is averaged over
    those steps, and precision over the labels admitted. With `partial` (a pool holding
    unlabeled-only images, y = -1), precision is over the admitted images that have a label,
    and `<name>_covered` is their share of the admitted."""
    mask = pl.weights.float()  # a soft weight counts as that share of an admission
    n = torch.full((), float(len(mask)), device=mask.device)
    scored = mask * (y_true >= 0).float() if partial else mask
    logs = {f"{name}_rate": torch.stack([mask.sum(), n]),
            f"{name}_precision": torch.stack([((pl.labels == y_true).float() * scored).sum(), scored.sum()])}
    if partial:
        logs[f"{name}_covered"] = torch.stack([scored.sum(), mask.sum()])
    if pl.conf is not None:
        logs[f"{name}_conf"] = torch.stack([pl.conf.float().sum(), n])
    return logs


def first_of_each(idx: Tensor, mask: Tensor) -> Tensor:
    """`mask` kept only at the first masked position of every distinct value of `idx`: one
    deterministic winner where a batch holds an image twice."""
    pos = torch.arange(len(idx), device=idx.device)
    key = torch.where(mask, idx, -1 - pos)  # unmasked positions never collide
    order = torch.argsort(key, stable=True)
    ranked = key[order]
    first = torch.ones_like(mask)
    first[1:] = ranked[1:] != ranked[:-1]
    out = torch.empty_like(mask)
    out[order] = first
    return out & mask


class PseudoLabelMemory:
    """Pseudo-labels per training image (-1 = none), on the device; checkpointed with the method."""

    def __init__(self, size: int, device: torch.device):
        self.labels = torch.full((size,), -1, dtype=torch.long, device=device)

    def lookup(self, idx: Tensor) -> Tensor:
        return self.labels[idx]

    def admit(self, idx: Tensor, labels: Tensor, mask: Tensor, rescore: bool = False) -> Tensor:
        """Store `labels` where `mask` and no label is stored yet (permanent memory), or, with
        `rescore`, replace the batch's labels by this step's (forgetting the unadmitted). An
        image twice in the batch takes its first admitted label. Returns the mask of written
        entries."""
        # every rank applies every rank's admissions, in row order: one memory, the same on all
        idx, labels, mask = all_cat(idx), all_cat(labels), all_cat(mask)
        if rescore:
            self.labels[idx] = -1
        current = self.labels[idx]
        new = first_of_each(idx, mask & (current < 0))
        # max over the writes to one entry: the new label beats the -1 a duplicate writes back
        self.labels.scatter_reduce_(0, idx, torch.where(new, labels, current), reduce="amax")
        return new

    def __len__(self) -> int:
        return int((self.labels >= 0).sum())

    def state_dict(self) -> dict:
        return {"labels": self.labels.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.labels.copy_(state["labels"].to(self.labels.device))


@dataclass
class ValidationGate:
    """Opens when high-confidence accuracy on a held-out split reaches `threshold` (percent),
    measured over at least `min_confident` confident images: one or two lucky images must not
    decide it.

    Re-decided at every reading after `warmup_steps`; `always_open` is the no-gate ablation."""
    threshold: float
    confidence: float
    warmup_steps: int
    min_confident: int = 1
    always_open: bool = False
    is_open: bool = False
    has_opened: bool = False  # ever open: a memory filled while open keeps its labels after a close
    last_hc_acc: float = 0.0
    last_hc_count: int = 0

    def __post_init__(self) -> None:
        self.is_open = self.is_open or self.always_open
        self.has_opened = self.has_opened or self.is_open

    def update(self, evaluation: Evaluation, step: int) -> bool:
        self.last_hc_acc, self.last_hc_count = evaluation.high_confidence_accuracy(self.confidence)
        if not self.always_open:
            self.is_open = (step >= self.warmup_steps and self.last_hc_count >= self.min_confident
                            and self.last_hc_acc >= self.threshold)
        self.has_opened = self.has_opened or self.is_open
        return self.is_open

    def state_dict(self) -> dict:
        return {"is_open": self.is_open, "has_opened": self.has_opened, "last_hc_acc": self.last_hc_acc,
                "last_hc_count": self.last_hc_count}

    def load_state_dict(self, state: dict) -> None:
        self.is_open, self.has_opened, self.last_hc_acc = state["is_open"], state["has_opened"], state["last_hc_acc"]
        self.last_hc_count = state["last_hc_count"]
