"""MAE pretraining (He et al., 2022) on every training image, labels unused.

Used as the first stage of `mae_finetune` and `semi_vit`; runnable alone. Per step: a random
resized crop + flip of each image, a random `mask_ratio` of its patches removed, the visible
ones encoded, all reconstructed by the decoder; MSE on the removed patches only.
"""
from __future__ import annotations

from torch import Tensor

from bench.batch import Batch
from bench.method import Method, register
from bench.options import Option, non_negative, positive, unit_open
from bench.stages import Stage


@register("mae_pretrain")
class MAEPretrain(Method):
    description = "MAE pretraining on all training images (a stage of mae_finetune, semi_vit)"
    options = {"mask_ratio": Option(0.75, "fraction of patches removed", **unit_open())}
    recipe = {"drop_path": 0.0, "beta2": 0.95}  # MAE pretraining: no stochastic depth, betas (0.9, 0.95)
    uses_labeled = False
    uses_unlabeled = True
    unlabeled_source = "all"
    uses_decoder = True
    classifies = False

    @classmethod
    def unlabeled_batch_size(cls, cfg) -> int:
        return cfg["batch_size"]

    def train_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        loss = self.reconstruction_loss(self.views.mae(batch.u), batch.u, self.cfg["mask_ratio"])
        return loss, {"loss_rec": loss.detach()}


# Pretraining inherits data, split, architecture and run mechanics from the run, never its
# fine-tuning recipe: MAE pretrains without layer decay, smoothing or mixing.
PRETRAIN_STAGE = Stage("pretrain", "mae_pretrain", "pretrain_", inherits=("data", "split", "model", "run"))


def pretrain_options(steps: int = 5000) -> dict[str, Option]:
    """Options of the MAE pretraining stage, as a later method declares them (`--pretrain-*`).
    Defaults: the official MAE recipe scaled to CIFAR (betas 0.9/0.95, wd 0.05, lr 1.5e-4 x bs/256)."""
    return {
        "pretrain_steps": Option(steps, "MAE pretraining steps (0: none, the encoder starts from scratch or from "
                                 "--init-from)", **non_negative()),
        "pretrain_batch_size": Option(256, "MAE pretraining batch size", **positive()),
        "pretrain_lr": Option(1.5e-4, "MAE pretraining peak lr", **positive()),
        "pretrain_warmup_steps": Option(steps // 20, "MAE pretraining warm-up steps", **non_negative()),
        "pretrain_weight_decay": Option(0.05, "MAE pretraining weight decay", **non_negative()),
        "pretrain_beta2": Option(0.95, "MAE pretraining AdamW beta2", **unit_open()),
        "pretrain_drop_path": Option(0.0, "stochastic depth during MAE pretraining", **unit_open()),
        "pretrain_mask_ratio": Option(0.75, "MAE pretraining mask ratio", **unit_open()),
    }
