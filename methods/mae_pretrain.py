"""MAE pretraining (He et al., 2022) on every training image, labels unused.

The first stage of every method that starts from MAE (`--start mae`: mae_finetune and semi_vit by
default; bench.method.stage.PRETRAIN); runnable alone. Per step: a random
resized crop + flip of each image, a random `mask_ratio` of its patches removed, the visible
ones encoded, all reconstructed by the decoder; MSE on the removed patches only.
"""
from __future__ import annotations

from torch import Tensor

from bench.method import Batch, Method, Option, register, unit_open


@register("mae_pretrain")
class MAEPretrain(Method):
    description = "MAE pretraining on all training images (the `--start mae` stage of every method)"
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
