"""Semi-MAE (Yu et al., 2023): FixMatch plus a parallel MAE branch through the shared encoder.

The MAE branch reconstructs the masked patches of (by default) the same weak unlabeled views the
pseudo-labels come from, with a light decoder:  L = L_sup + lambda_u L_u + lambda_rec L_rec.
The paper publishes no hyper-parameters; defaults follow METHODS.md 1.3.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bench.method import Batch, Images, Method, Option, Pass, pseudo_label_options, register, unit_open


@register("semi_mae")
class SemiMAE(Method):
    description = "Semi-MAE: FixMatch + MAE reconstruction of weak unlabeled views"
    options = {
        **pseudo_label_options(tau=0.95, mu=7.0, lambda_u=1.0, teacher="online"),
        "mask_ratio": Option(0.75, "fraction of patches the MAE branch removes", **unit_open()),
        "lambda_rec": Option(1.0, "weight of the reconstruction loss (0 = FixMatch)", type=float,
                             check=lambda v: v >= 0, check_msg=">= 0"),
        "mae_input": Option("weak_unlabeled", "images the MAE branch reconstructs",
                            choices=("weak_unlabeled", "weak_all", "strong")),
    }
    # METHODS.md 1.3: the FixMatch branch, plain CE on weak labeled views
    recipe = {"label_smoothing": 0.0, "labeled_view": "weak", "mixup_alpha": 0.0, "cutmix_alpha": 0.0}
    uses_unlabeled = True
    uses_decoder = True
    pseudo_labels = True
    threshold_option = "tau"

    @classmethod
    def step_passes(cls, cfg) -> list[Pass]:
        reconstructed = cls.unlabeled_batch_size(cfg) + (cfg["batch_size"] if cfg["mae_input"] == "weak_all" else 0)
        return [*super().step_passes(cfg)[:-1], Pass(reconstructed, mask_ratio=cfg["mask_ratio"])]

    def mae_input(self, batch: Batch, x_weak: Tensor, x_strong: Tensor) -> tuple[Tensor, Images]:
        """The views the MAE branch reconstructs, and the images they show."""
        kind = self.cfg["mae_input"]
        if kind == "weak_unlabeled":
            return x_weak, batch.u
        if kind == "strong":
            return x_strong, batch.u
        return torch.cat([self.views.weak(batch.l), x_weak]), Images.cat(batch.l, batch.u)

    def train_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        x_weak, x_strong = self.views.weak(batch.u), self.views.strong(batch.u)
        pl = self.pseudo_label(self.teacher_probs(x_weak, cfg["teacher"]), batch.idx_u)
        loss_sup = self.supervised_loss(batch.l, batch.y_l)
        loss_unsup = self.hard_pseudo_label_loss(x_strong, pl)
        loss_rec = self.reconstruction_loss(*self.mae_input(batch, x_weak, x_strong), cfg["mask_ratio"])
        loss = loss_sup + cfg["lambda_u"] * loss_unsup + cfg["lambda_rec"] * loss_rec
        return loss, {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(),
                      "loss_rec": loss_rec.detach()}
