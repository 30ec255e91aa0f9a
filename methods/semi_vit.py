"""Semi-ViT (Cai et al., 2022): MAE pretraining -> supervised fine-tuning -> semi-supervised
fine-tuning with an EMA teacher and probabilistic pseudo-mixup.

Stage 3, per step: the EMA teacher labels the weak views; strong views are mixed with a random
partner, weighting each by its confidence (lambda_i = p_i / (p_i + p_j)), by mixup or cutmix at
probability 0.5 (cutmix lambda corrected to the pasted area), targets smoothed and mixed the
same way, and the sample kept if max(p_i, p_j) >= tau.  L = L_sup + lambda_u * L_u.
`--no-pseudo-mixup` gives EMA-Teacher; `--teacher online` a FixMatch-style teacher.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bench.method import Batch, register, soft_cross_entropy
from bench.mixing import mix, one_hot_smooth, prob_pseudo_mix_lambda
from bench.options import Option, non_negative, unit_open
from bench.stages import Stage
from methods.fixmatch import FixMatch, unlabeled_options
from methods.mae_pretrain import PRETRAIN_STAGE, pretrain_options


@register("semi_vit")
class SemiViT(FixMatch):
    description = "Semi-ViT: MAE -> supervised -> EMA-teacher + probabilistic pseudo-mixup"
    options = {
        **unlabeled_options(tau=0.6, mu=5.0, lambda_u=5.0, teacher="ema"),
        "pseudo_mixup": Option(True, "probabilistic pseudo-mixup (off = EMA-Teacher)"),
        "pl_smoothing": Option(0.1, "label smoothing of the mixed pseudo-label targets", **unit_open()),
        "cutmix_prob": Option(0.5, "probability of cutmix (else mixup) per unlabeled image", **unit_open()),
        **pretrain_options(),
        "finetune_steps": Option(2000, "supervised fine-tuning steps (stage 2)", **non_negative()),
        "finetune_lr": Option(5e-4, "supervised fine-tuning peak lr (stage 2)", type=float,
                              check=lambda v: v > 0, check_msg="> 0"),
        "finetune_warmup_steps": Option(100, "supervised fine-tuning warm-up steps", **non_negative()),
    }
    # Semi-ViT's 10 % settings for the labeled branch (stages 2 and 3): smoothing 0.1, mixup 0.8 /
    # cutmix 1.0 on RandAugment views, layer decay 0.75. The EMA teacher's tau (0.5-0.7) stays
    # below the 0.91 cap smoothing puts on confidence.
    recipe = {"label_smoothing": 0.1, "labeled_view": "strong", "mixup_alpha": 0.8, "cutmix_alpha": 1.0,
              "layer_decay": 0.75}
    stages = (PRETRAIN_STAGE, Stage("finetune", "supervised", "finetune_", keep_head=True))

    def train_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.cfg["pseudo_mixup"]:
            return super().train_step(batch)  # EMA-Teacher: FixMatch's step with the EMA teacher
        cfg = self.cfg
        pl, logs = self.pseudo_label(self.views.weak(batch.x_u), batch.y_u)
        x_strong = self.views.strong(batch.x_u)
        n, dev = len(x_strong), x_strong.device
        perm = torch.randperm(n, generator=self.generator, device=dev)
        lam = prob_pseudo_mix_lambda(pl.conf, perm)
        use_cutmix = torch.rand(n, generator=self.generator, device=dev) < cfg["cutmix_prob"]
        targets = one_hot_smooth(pl.labels, self.num_classes, cfg["pl_smoothing"])
        x_mixed, t_mixed, _ = mix(x_strong, targets, lam, perm, use_cutmix, self.generator)
        keep = torch.maximum(pl.conf, pl.conf[perm]) >= cfg["tau"]
        loss_unsup = soft_cross_entropy(self.model(x_mixed), t_mixed, weights=keep.float())
        loss_sup = self.supervised_loss(batch.x_l, batch.y_l)
        loss = loss_sup + cfg["lambda_u"] * loss_unsup
        logs["mix_keep_rate"] = keep.float().mean()
        return loss, {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(), **logs}
