"""SSMAE (Faysal et al., 2026): joint MAE reconstruction + classification on labeled and
pseudo-labeled images, with pseudo-labelling switched on by a validation-driven gate.

Per step: unlabeled images enter the classification batch (weak view) when their pseudo-label is
in the memory; a new pseudo-label is admitted only while the gate is open, with confidence > c
on BOTH the weak and strong views and the same class on both. The gate is re-decided at every
evaluation after the warm-up: open iff the high-confidence accuracy (accuracy over predictions
with confidence > c) on the VALIDATION split reaches the gate threshold. The reference code's
flaws are fixed (METHODS.md 2.9): views come from raw images, the gate never reads test data,
the teacher passes run without autograd and only while the gate is open, training length is in
steps, and the memory is saved with every checkpoint.

    L = lambda_rec * L_MAE(labeled + unlabeled) + lambda_cls * CE(labeled + admitted unlabeled)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.method import (Batch, Images, Method, Option, Pass, PseudoLabelMemory, PseudoLabels, UsageError,
                          ValidationGate, agreeing, non_negative, positive, register, threshold_options,
                          unit_closed, unit_open, weighted_mean)


@register("ssmae")
class SSMAE(Method):
    description = "SSMAE: MAE + classification with gated, agreement-filtered pseudo-labels"
    options = {
        "mu": Option(2.0, "unlabeled images per labeled image in a step (paper: 32 per 16)", type=float, **positive()),
        "mask_ratio": Option(0.75, "fraction of patches the MAE branch removes", **unit_open()),
        "confidence": Option(0.95, "admission (both views) and high-confidence threshold c", **unit_closed()),
        "gate_threshold": Option(70.0, "high-confidence accuracy (%) that opens the gate",
                                 check=lambda v: 0 <= v <= 100, check_msg="in [0, 100]"),
        "gate_warmup_steps": Option(3120, "steps of supervised + MAE only before the gate is read", **non_negative()),
        "gate_every": Option(0, "steps between gate decisions on validation (paper: every epoch); 0 = at "
                             "every evaluation", **non_negative()),
        "gate_min_confident": Option(10, "confident images the gate's split must hold before its "
                                     "high-confidence accuracy counts", **positive()),
        "gate": Option(True, "use the gate (off: pseudo-labelling from step 0)"),
        "gate_split": Option("val", "split the gate reads: validation, or the labeled-train split "
                             "(no extra labels)", choices=("val", "labeled")),
        "agreement": Option(True, "require confident, agreeing weak and strong views (off: weak only)"),
        "memory": Option("permanent", "pseudo-label memory: permanent (paper) or re-scored each step",
                         choices=("permanent", "rescored")),
        "lambda_rec": Option(1.0, "weight of the MAE loss (0 = no reconstruction)", type=float, **non_negative()),
        "lambda_cls": Option(1.0, "weight of the classification loss", type=float, **non_negative()),
        "mae_view": Option("weak", "augmentation of the MAE branch's images", choices=("weak", "mae", "strong")),
        **threshold_options(),
    }
    # The reference's labeled branch: plain CE (no smoothing, no mixing) on lightly augmented
    # views; smoothing would cap confidence below c and keep the gate shut.
    recipe = {"label_smoothing": 0.0, "labeled_view": "weak", "mixup_alpha": 0.0, "cutmix_alpha": 0.0}
    uses_unlabeled = True
    uses_decoder = True
    pseudo_labels = True
    threshold_option = "confidence"  # unreachable, it would also keep the gate shut
    strict_threshold = True

    @classmethod
    def check(cls, cfg, num_classes, split) -> None:
        super().check(cfg, num_classes, split)
        if cfg["threshold_policy"] == "softmatch":
            raise UsageError("ssmae: its memory keeps a label or none, so softmatch's soft weights have no place; "
                             "use --threshold-policy fixed, align, flexmatch or freematch")
        if not cfg["gate"]:
            return
        first = min(-(-cfg["gate_warmup_steps"] // every) * every
                    for every in (cfg["eval_every"], cfg["gate_every"]) if every > 0)
        if first >= cfg["steps"]:
            raise UsageError(f"ssmae: the gate is first read at step {first} (--gate-warmup-steps "
                             f"{cfg['gate_warmup_steps']}, --gate-every {cfg['gate_every']}, --eval-every "
                             f"{cfg['eval_every']}) but the run ends at --steps {cfg['steps']}, so it never opens; "
                             f"lower --gate-warmup-steps or raise --steps")
        n = len(split.val) if cfg["gate_split"] == "val" else len(split.labeled)
        if n < cfg["gate_min_confident"]:
            raise UsageError(f"ssmae: the gate needs --gate-min-confident {cfg['gate_min_confident']} confident "
                             f"images but its split (--gate-split {cfg['gate_split']}) holds only {n}; lower "
                             f"--gate-min-confident or enlarge the split")

    @classmethod
    def step_passes(cls, cfg) -> list[Pass]:
        """Both views through the teacher (once the gate is open), one CE pass over labeled and
        unlabeled images, and the MAE pass over them all."""
        labeled, unlabeled = cfg["batch_size"], cls.unlabeled_batch_size(cfg)
        return [Pass(2 * unlabeled, trained=False), Pass(labeled + unlabeled),
                Pass(labeled + unlabeled, mask_ratio=cfg["mask_ratio"])]

    def setup(self) -> None:
        cfg = self.cfg
        self.memory = PseudoLabelMemory(self.data.size, self.data.device)
        self.gate = ValidationGate(cfg["gate_threshold"], cfg["confidence"], cfg["gate_warmup_steps"],
                                   min_confident=cfg["gate_min_confident"], always_open=not cfg["gate"])

    def admit(self, batch: Batch, x_weak: Tensor, x_strong: Tensor) -> None:
        """Score the unlabeled batch on both views (one no-grad pass) and update the memory with
        what the threshold policy admits on the weak view (and, with agreement, on the strong
        view as well, for the same class), as far as `--pl-mode` lets it through."""
        probs = self.teacher_probs(torch.cat([x_weak, x_strong]))
        weak = self.policy(probs[: len(x_weak)], batch.idx_u)  # the policy learns from the weak view
        if self.cfg["agreement"]:
            weak = agreeing(weak, self.policy.peek(probs[len(x_weak):]))
        self.log_pseudo_labels(weak, "admit")  # the new labels, among the images scored this step
        weak = self.pl_mode(weak)
        self.memory.admit(batch.idx_u, weak.labels, weak.mask, rescore=self.cfg["memory"] == "rescored")

    def train_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        x_weak = self.views.weak(batch.u)
        if self.gate.is_open:  # the teacher passes are skipped while the gate is closed
            self.admit(batch, x_weak, self.views.strong(batch.u))
        pseudo = self.memory.lookup(batch.idx_u)
        used = pseudo >= 0
        self.log_pseudo_labels(PseudoLabels(pseudo.clamp(min=0), None, used))  # the labels this step trains
        # One CE over labeled + admitted unlabeled images: a pseudo-labeled image weighs as a labeled one.
        x_l = self.views.labeled(batch.l, cfg["labeled_view"])
        # Before the gate first opens the memory is empty and every unlabeled weight 0: skip those images.
        logits = self.model(torch.cat([x_l, x_weak]) if self.gate.has_opened else x_l).float()
        targets = torch.cat([batch.y_l, pseudo.clamp(min=0)])[: len(logits)]
        weights = torch.cat([torch.ones_like(batch.y_l, dtype=torch.float), used.float()])[: len(logits)]
        ce = F.cross_entropy(logits, targets, reduction="none", label_smoothing=cfg["label_smoothing"])
        loss_cls = weighted_mean(ce, weights)
        images = Images.cat(batch.l, batch.u)
        loss_rec = self.reconstruction_loss(self.views.labeled(images, cfg["mae_view"]), images, cfg["mask_ratio"])
        loss = cfg["lambda_rec"] * loss_rec + cfg["lambda_cls"] * loss_cls
        # logged apart: the labeled images' CE, comparable with the other methods' loss_sup
        return loss, {"loss_cls": loss_cls.detach(), "loss_rec": loss_rec.detach(),
                      "loss_sup": ce[: len(batch.y_l)].mean().detach()}

    def on_validation(self, val, step: int) -> dict[str, float]:
        source = val["raw"] if self.cfg["gate_split"] == "val" else self.evaluate_indices(self.data.labeled)
        self.gate.update(source, step)
        return {"gate.open": float(self.gate.is_open), "gate.hc_acc": self.gate.last_hc_acc,
                "gate.hc_count": float(self.gate.last_hc_count), "memory.size": float(len(self.memory))}

    def validation_every(self) -> int | None:
        return self.cfg["gate_every"] or None

    def status(self) -> dict[str, str]:
        return {"gate": "open" if self.gate.is_open else "shut", "mem": str(len(self.memory))}

    def steady_state(self) -> None:
        self.gate.is_open = self.gate.has_opened = True  # a long run's steps: teacher passes, full CE

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict(), "gate": self.gate.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
        self.gate.load_state_dict(state["gate"])
