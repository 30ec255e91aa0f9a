"""MAE pretraining -> supervised fine-tuning on the labeled split (the MAE baseline).

The run is two cached stages: MAE pretraining (`--pretrain-*`, shared by every method of the
seed that starts from MAE) and the fine-tune itself, trained with the run's own options. The
fine-tune is a stage, not a run of its own, so Semi-ViT's supervised stage at the same recipe is
this very model: `semi_vit` against `mae_finetune` compares the semi-supervised stage with the
model it starts from. The pretrained head is discarded.
"""
from __future__ import annotations

from torch import Tensor

from bench.method import Batch, Method, Stage, register

# the fine-tune, trained with every option of the run (no prefix): the run's result is the stage's
FINETUNE = Stage("finetune", "supervised", "", keep_head=True, about="the fine-tune")


@register("mae_finetune")
class MAEFinetune(Method):
    description = "MAE pretraining on all images, then supervised fine-tuning"
    # MAE's fine-tuning recipe (FINETUNE.md): smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment,
    # layer decay 0.65; from the MAE stage.
    recipe = {"label_smoothing": 0.1, "labeled_view": "strong", "mixup_alpha": 0.8, "cutmix_alpha": 1.0,
              "layer_decay": 0.65, "start": "mae"}
    stages = (FINETUNE,)
    own_training = False

    def train_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The fine-tune's step, as its stage trains it (supervised's): what `bench speed` times."""
        loss = self.supervised_loss(batch.l, batch.y_l)
        return loss, {"loss_sup": loss.detach()}
