"""Supervised ViT on the labeled subset: the baseline every semi-supervised method must beat.

The strong recipe (fast preset) is DeiT-style: RandAugment + cutout view, mixup/cutmix, label
smoothing, stochastic depth, AdamW with warm-up + cosine and an EMA model, trained for the same
number of optimizer steps as the semi-supervised methods it is compared with.
"""
from __future__ import annotations

from torch import Tensor

from bench.method import Batch, Method, register


@register("supervised")
class Supervised(Method):
    description = "supervised ViT on the labeled split only"
    # METHODS.md 4.1, the tuned small-image baseline: DeiT-style regularisation.
    recipe = {"label_smoothing": 0.1, "labeled_view": "strong", "mixup_alpha": 0.8, "cutmix_alpha": 1.0}

    def train_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self.supervised_loss(batch.l, batch.y_l)
        return loss, {"loss_sup": loss.detach()}
