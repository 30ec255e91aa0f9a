"""Threshold policies: which pseudo-labels a thresholding method admits, and with what weight.

One option, `--threshold-policy`, for every method that thresholds a teacher's confidence:
- `fixed`: confidence >= tau (FixMatch).
- `align`: distribution alignment (ReMixMatch): the teacher's probabilities scaled by a uniform
  target over an EMA of their mean on unlabeled images, renormalised, then `fixed` on them.
- `flexmatch`: FlexMatch's class-wise curriculum: per class, the unlabeled images whose latest
  confident (>= tau) prediction is that class; beta_c = their count over the largest count (the
  still-unlabeled images counted too, the warm-up); class threshold tau * beta_c / (2 - beta_c).
- `freematch`: FreeMatch's self-adaptive thresholds: a global level, the EMA of the batch's mean
  confidence (from 1/K), times the EMA of the mean class probabilities over their maximum.
- `softmatch`: SoftMatch's truncated-Gaussian weights on aligned probabilities: weight 1 above
  the EMA mean of the confidence, exp(-(p - mu)^2 / (2 var / n^2)) below it.

Each policy updates its statistics from the global batch (the rows of every rank, gathered in
row order: the same numbers as on one rank), before it decides (FlexMatch: after, as its
reference does), and keeps them in the method's checkpoint. Update rules follow USB's
`semilearn/algorithms/{flexmatch,freematch,softmatch}` and its distribution-alignment hook.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from bench.distributed import all_cat, all_sum, world
from bench.options import PSEUDO, Option, positive, unit_open
from bench.method.pseudo import PseudoLabels, first_of_each, threshold

POLICIES = ("fixed", "align", "flexmatch", "freematch", "softmatch")


def threshold_options(policy: str = "fixed") -> dict[str, Option]:
    """The policy options a thresholding method declares beside its threshold."""
    return {
        "threshold_policy": Option(policy, "how the threshold adapts: fixed, align (distribution alignment), "
                                   "flexmatch (class-wise curriculum), freematch (self-adaptive), softmatch "
                                   "(truncated-Gaussian weights)", choices=POLICIES, group=PSEUDO),
        "policy_momentum": Option(0.999, "EMA momentum of the policy's statistics (align, freematch, softmatch)",
                                  group=PSEUDO, **unit_open()),
        "flex_warmup": Option(True, "flexmatch: count still-unlabeled images when normalising the class counts "
                              "(its threshold warm-up)", group=PSEUDO),
        "soft_sigmas": Option(2.0, "softmatch: the Gaussian's standard deviation is the confidence's over this",
                              type=float, group=PSEUDO, **positive()),
    }


class Policy:
    """Fixed threshold; the base of the adaptive ones. `__call__` updates the statistics from
    this step's teacher probabilities and decides; `peek` decides without updating (a second
    view of the same images)."""
    name: ClassVar[str] = "fixed"

    def __init__(self, tau: float, num_classes: int, device, cfg: dict[str, Any], *, strict: bool = False,
                 pool: Tensor | None = None, index_space: int = 0):
        self.tau, self.k, self.strict, self.cfg = tau, num_classes, strict, cfg
        self.m = cfg.get("policy_momentum", 0.999)
        self.device = device

    def passes(self, conf: Tensor, cut: Tensor | float) -> Tensor:
        return conf > cut if self.strict else conf >= cut

    def update(self, probs: Tensor, idx: Tensor) -> None:
        """Statistics from the step's probabilities (this rank's rows; gathered inside)."""

    def decide(self, probs: Tensor) -> PseudoLabels:
        return threshold(probs, self.tau, self.strict)

    def __call__(self, probs: Tensor, idx: Tensor) -> PseudoLabels:
        probs = probs.float()
        self.update(probs, idx)
        return self.decide(probs)

    def peek(self, probs: Tensor) -> PseudoLabels:
        return self.decide(probs.float())

    def state(self) -> dict[str, Tensor]:
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.state().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, v in self.state().items():
            v.copy_(state[k].to(v.device))


class Align(Policy):
    """Distribution alignment to a uniform target (CIFAR's splits are class-balanced)."""
    name = "align"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.p_model = torch.full((self.k,), 1.0 / self.k, device=self.device)

    def update(self, probs: Tensor, idx: Tensor) -> None:
        self.p_model.mul_(self.m).add_(all_cat(probs).mean(0), alpha=1 - self.m)

    def aligned(self, probs: Tensor) -> Tensor:
        scaled = probs * ((1.0 / self.k + 1e-6) / (self.p_model + 1e-6))
        return scaled / scaled.sum(dim=1, keepdim=True)

    def decide(self, probs: Tensor) -> PseudoLabels:
        return super().decide(self.aligned(probs))

    def state(self) -> dict[str, Tensor]:
        return {"p_model": self.p_model}


class FlexMatch(Policy):
    """Curriculum pseudo-labelling: slowly learned classes get lower thresholds early on."""
    name = "flexmatch"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.pool_size, self.warmup = len(kw["pool"]), self.cfg.get("flex_warmup", True)
        # the latest confident label of every training image (-1: none yet), indexed as the pool is
        self.selected = torch.full((kw["index_space"],), -1, dtype=torch.long, device=self.device)
        self.beta = torch.zeros(self.k, device=self.device)

    def class_thresholds(self) -> Tensor:
        return self.tau * self.beta / (2.0 - self.beta)  # the convex map x / (2 - x)

    def decide(self, probs: Tensor) -> PseudoLabels:
        conf, labels = probs.max(dim=1)
        return PseudoLabels(labels, conf, self.passes(conf, self.class_thresholds()[labels]))

    def __call__(self, probs: Tensor, idx: Tensor) -> PseudoLabels:
        probs = probs.float()
        pl = self.decide(probs)  # the curriculum of the steps before this one decides
        self.update(probs, idx)
        return pl

    def update(self, probs: Tensor, idx: Tensor) -> None:
        conf, labels = all_cat(probs).max(dim=1)
        idx = all_cat(idx)
        sure = first_of_each(idx, self.passes(conf, self.tau))  # one winner where an image is twice
        self.selected[idx[sure]] = labels[sure]
        counts = torch.bincount(self.selected[self.selected >= 0], minlength=self.k).float()
        unused = self.pool_size - counts.sum()
        top = torch.maximum(counts.max(), unused) if self.warmup else counts.max()
        if counts.max() < self.pool_size:  # the reference's guard: not every image in one class
            self.beta = counts / top.clamp_min(1.0)

    def state(self) -> dict[str, Tensor]:
        return {"selected": self.selected, "beta": self.beta}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.selected.copy_(state["selected"].to(self.device))
        self.beta = state["beta"].to(self.device).clone()


class FreeMatch(Policy):
    """Self-adaptive thresholds; `fairness_loss` is FreeMatch's self-adaptive fairness term."""
    name = "freematch"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.time_p = torch.full((), 1.0 / self.k, device=self.device)
        self.p_model = torch.full((self.k,), 1.0 / self.k, device=self.device)
        self.label_hist = torch.full((self.k,), 1.0 / self.k, device=self.device)

    def update(self, probs: Tensor, idx: Tensor) -> None:
        everyone = all_cat(probs)
        conf, labels = everyone.max(dim=1)
        m = self.m
        self.time_p = m * self.time_p + (1 - m) * conf.mean()
        self.p_model = m * self.p_model + (1 - m) * everyone.mean(0)
        hist = torch.bincount(labels, minlength=self.k).float()
        self.label_hist = m * self.label_hist + (1 - m) * hist / hist.sum()

    def class_thresholds(self) -> Tensor:
        return self.time_p * self.p_model / self.p_model.max()

    def decide(self, probs: Tensor) -> PseudoLabels:
        conf, labels = probs.max(dim=1)
        return PseudoLabels(labels, conf, self.passes(conf, self.class_thresholds()[labels]))

    def fairness_loss(self, logits_strong: Tensor, mask: Tensor) -> Tensor:
        """sum_c P_c log Q_c, where P is the EMA class distribution over its label histogram and
        Q the mean strong-view prediction of the admitted images over their argmax histogram,
        each normalised to sum 1 (USB's sign: minimising it pushes Q towards P's spread); 0 when
        no image is admitted. Q is over the admitted images of every rank: the value is the
        one-rank value, and each rank's gradient, scaled by the world size, averages to it."""
        q = logits_strong.float().softmax(dim=1) * mask.float()[:, None]
        local = q.sum(0)
        counts = torch.bincount(q.argmax(dim=1)[mask], minlength=self.k).float()
        stats = all_sum(torch.cat([local.detach(), counts]))  # one collective for both
        total, hist_counts = stats[:self.k], stats[self.k:]
        n = hist_counts.sum()
        if float(n) == 0:  # the same on every rank: no rank skips a collective
            return logits_strong.sum() * 0.0
        summed = total + world().size * (local - local.detach())  # the global sum's value, this rank's gradient
        p = _sum_normalised(self.p_model * _safe_inverse(self.label_hist))
        mean_q = _sum_normalised(summed / n * _safe_inverse(hist_counts / n))
        return (p.detach() * torch.log(mean_q + 1e-12)).sum()

    def state(self) -> dict[str, Tensor]:
        return {"time_p": self.time_p, "p_model": self.p_model, "label_hist": self.label_hist}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in ("time_p", "p_model", "label_hist"):
            setattr(self, k, state[k].to(self.device).clone())


class SoftMatch(Align):
    """Soft weights instead of a cut: every pseudo-label trains, the unsure ones less."""
    name = "softmatch"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.mu = torch.full((), 1.0 / self.k, device=self.device)
        self.var = torch.ones((), device=self.device)
        self.sigmas = self.cfg.get("soft_sigmas", 2.0)

    def update(self, probs: Tensor, idx: Tensor) -> None:
        super().update(probs, idx)  # the alignment first: the weights read aligned confidences
        conf = self.aligned(all_cat(probs)).max(dim=1).values
        m = self.m
        self.mu = m * self.mu + (1 - m) * conf.mean()
        self.var = m * self.var + (1 - m) * (conf.var(unbiased=True) if len(conf) > 1 else torch.zeros_like(self.var))

    def decide(self, probs: Tensor) -> PseudoLabels:
        conf = self.aligned(probs).max(dim=1).values
        below = (conf - self.mu).clamp(max=0.0)
        weight = torch.exp(-below ** 2 / (2 * self.var / self.sigmas ** 2))
        labels = probs.argmax(dim=1)  # the label is the raw prediction's; alignment sets the weight only
        return PseudoLabels(labels, conf, weight > 0, weight)

    def state(self) -> dict[str, Tensor]:
        return {**super().state(), "mu": self.mu, "var": self.var}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.p_model.copy_(state["p_model"].to(self.device))
        self.mu, self.var = state["mu"].to(self.device).clone(), state["var"].to(self.device).clone()


def _safe_inverse(x: Tensor) -> Tensor:
    inv = 1.0 / x
    return torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))


def _sum_normalised(x: Tensor) -> Tensor:
    return x / x.sum().clamp_min(1e-12)


REGISTRY = {p.name: p for p in (Policy, Align, FlexMatch, FreeMatch, SoftMatch)}


def make_policy(cfg: dict[str, Any], tau: float, num_classes: int, device, *, pool: Tensor, index_space: int,
                strict: bool = False) -> Policy:
    """The run's policy: `cfg["threshold_policy"]` at threshold `tau`, for pseudo-labels of the
    unlabeled `pool` (indices into a training set of `index_space` images; FlexMatch counts
    over it); `strict` admits above tau only."""
    return REGISTRY[cfg.get("threshold_policy", "fixed")](tau, num_classes, device, cfg, strict=strict, pool=pool,
                                                          index_space=index_space)
