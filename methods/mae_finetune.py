"""MAE pretraining -> supervised fine-tuning on the labeled split (the MAE baseline).

Stage 1 (`--pretrain-*` options) is cached by its config, so a sweep over fine-tuning knobs
pretrains once. The fine-tuning step is the supervised one; the pretrained head is discarded.
"""
from __future__ import annotations

from bench.method import register
from methods.mae_pretrain import PRETRAIN_STAGE, pretrain_options
from methods.supervised import Supervised


@register("mae_finetune")
class MAEFinetune(Supervised):
    description = "MAE pretraining on all images, then supervised fine-tuning"
    options = pretrain_options()
    # MAE's fine-tuning recipe (FINETUNE.md): smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment,
    # layer decay 0.65.
    recipe = {**Supervised.recipe, "layer_decay": 0.65}
    stages = (PRETRAIN_STAGE,)
