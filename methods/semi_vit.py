"""Semi-ViT (Cai et al., 2022): MAE pretraining -> supervised fine-tuning -> semi-supervised
fine-tuning with an EMA teacher and probabilistic pseudo-mixup.

Stage 3, per step: the EMA teacher labels the weak views; strong views are mixed with a random
partner, weighting each by its confidence (lambda_i = p_i / (p_i + p_j)), by mixup or cutmix at
probability 0.5 (cutmix lambda corrected to the pasted area), targets smoothed and mixed the
same way, and the sample kept if max(p_i, p_j) >= tau.  L = L_sup + lambda_u * L_u.
`--no-pseudo-mixup` gives EMA-Teacher (hard labels on the strong views, FixMatch's loss);
`--teacher online` a FixMatch-style teacher.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bench.batch import Batch
from bench.method import register, soft_cross_entropy, weighted_mean
from bench.mixing import mix, one_hot_smooth, partners_of, prob_pseudo_mix_lambda
from bench.options import Option, non_negative, positive, unit_closed, unit_open, unit_open_closed
from bench.pseudo import PseudoLabels
from bench.stages import Stage
from methods.fixmatch import FixMatch, unlabeled_options
from methods.mae_pretrain import PRETRAIN_STAGE, pretrain_options


@register("semi_vit")
class SemiViT(FixMatch):
    description = "Semi-ViT: MAE -> supervised -> EMA-teacher + probabilistic pseudo-mixup"
    options = {
        # tau 0.5: Semi-ViT's ViT-B value at 10 % labels, the suite's default budget (its 1 %
        # value is 0.6, its code's default 0.7); the EMA teacher, lambda_u 5 and mu 5 are common
        # to every Semi-ViT setting (METHODS.md 3.4).
        **unlabeled_options(tau=0.5, mu=5.0, lambda_u=5.0, teacher="ema"),
        "pseudo_mixup": Option(True, "probabilistic pseudo-mixup (off = EMA-Teacher)"),
        "pl_smoothing": Option(0.1, "label smoothing of the mixed pseudo-label targets", **unit_open()),
        "cutmix_prob": Option(0.5, "probability of cutmix (else mixup) per unlabeled image", **unit_open()),
        **pretrain_options(),
        "finetune_steps": Option(2000, "supervised fine-tuning steps (stage 2)", **positive()),
        "finetune_lr": Option(5e-4, "supervised fine-tuning peak lr (stage 2)", type=float,
                              check=lambda v: v > 0, check_msg="> 0"),
        "finetune_warmup_steps": Option(100, "supervised fine-tuning warm-up steps", **non_negative()),
        # Stage 2's own recipe where it differs from stage 3's (Semi-ViT's FINETUNE.md); unset: stage 3's.
        "finetune_batch_size": Option(None, "stage 2 labeled batch (unset: --batch-size)", type=int, **positive()),
        "finetune_layer_decay": Option(None, "stage 2 layer decay (Semi-ViT: 0.65 for ViT-B; unset: --layer-decay)",
                                       type=float, **unit_open_closed()),
        "finetune_drop_path": Option(None, "stage 2 stochastic depth (unset: --drop-path)", type=float, **unit_open()),
        "finetune_mixup_alpha": Option(None, "stage 2 mixup alpha (unset: --mixup-alpha)", type=float,
                                       **non_negative()),
        "finetune_cutmix_alpha": Option(None, "stage 2 cutmix alpha (unset: --cutmix-alpha)", type=float,
                                        **non_negative()),
        "finetune_erase_prob": Option(None, "stage 2 random erasing (unset: --erase-prob)", type=float,
                                      **unit_closed()),
    }
    # Semi-ViT's 10 % settings for the labeled branch (stages 2 and 3): smoothing 0.1, mixup 0.8 /
    # cutmix 1.0 on RandAugment views, layer decay 0.75. The EMA teacher's tau (0.5-0.7) stays
    # below the 0.91 cap smoothing puts on confidence.
    recipe = {"label_smoothing": 0.1, "labeled_view": "strong", "mixup_alpha": 0.8, "cutmix_alpha": 1.0,
              "layer_decay": 0.75}
    stages = (PRETRAIN_STAGE, Stage("finetune", "supervised", "finetune_", keep_head=True))

    def train_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        pl = self.pseudo_label(self.views.weak(batch.u))  # the EMA teacher, by default
        x_strong = self.views.strong(batch.u)
        logs: dict[str, Tensor] = {}
        if cfg["pseudo_mixup"]:
            loss_unsup, logs["mix_keep_rate"] = self.pseudo_mixup_loss(batch, x_strong, pl)
        else:  # EMA-Teacher: hard labels on the strong views
            loss_unsup = self.hard_pseudo_label_loss(x_strong, pl)
        loss_sup = self.supervised_loss(batch.l, batch.y_l)
        loss = loss_sup + cfg["lambda_u"] * loss_unsup
        return loss, {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(), **logs}

    def pseudo_mixup_loss(self, batch: Batch, x_strong: Tensor, pl: PseudoLabels) -> tuple[Tensor, Tensor]:
        """Probabilistic pseudo-mixup: each strong view mixed with a random partner, weighted by
        the two confidences; kept when the more confident of the two passes tau. Returns the
        loss (over all unlabeled images) and the share kept."""
        cfg, draws = self.cfg, self.random.on(batch.u)
        perm = draws.partners()
        conf_p = partners_of(pl.conf, perm, batch.u)
        lam = prob_pseudo_mix_lambda(pl.conf, conf_p)
        use_cutmix = draws.uniform() < cfg["cutmix_prob"]
        targets = one_hot_smooth(pl.labels, self.num_classes, cfg["pl_smoothing"])
        x_mixed, t_mixed, _ = mix(x_strong, targets, lam, partners_of(x_strong, perm, batch.u),
                                  partners_of(targets, perm, batch.u), use_cutmix, draws)
        keep = (torch.maximum(pl.conf, conf_p) >= cfg["tau"]).float()
        return soft_cross_entropy(self.model(x_mixed), t_mixed, weights=keep), weighted_mean(keep)
