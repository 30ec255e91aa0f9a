"""FreeMatch (Wang et al., 2023): self-adaptive thresholds and self-adaptive fairness.

The threshold follows the model (bench.method.thresholds, `freematch`): a global level, the EMA of the
unlabeled batch's mean confidence (from 1/K, so it admits early and tightens as the model learns),
times each class's EMA mean probability over the largest. The fairness term asks the admitted
images' strong-view predictions to spread over the classes as the model's EMA class distribution
does, which keeps a few classes from taking every pseudo-label.

    L = L_sup + lambda_u * mean_i( 1[max q_i >= tau_t(argmax q_i)] * CE(f(strong_i), argmax q_i) )
        + lambda_f * L_fair
"""
from __future__ import annotations

from torch import Tensor

from bench.method import Batch, Method, Option, UsageError, non_negative, pseudo_label_options, register


@register("freematch")
class FreeMatch(Method):
    description = "FreeMatch: self-adaptive thresholds + fairness"
    options = {
        # tau is not read by the freematch policy (its threshold adapts); kept for the other policies
        **pseudo_label_options(tau=0.95, mu=7.0, lambda_u=1.0, teacher="online", policy="freematch"),
        # USB's configs: 0.001 on every dataset; 0 = SAT alone (no fairness term)
        "lambda_f": Option(0.001, "weight of the self-adaptive fairness term (0: thresholds only)", type=float,
                           **non_negative()),
    }
    recipe = {"label_smoothing": 0.0, "labeled_view": "weak", "mixup_alpha": 0.0, "cutmix_alpha": 0.0}
    uses_unlabeled = True
    pseudo_labels = True
    threshold_option = "tau"

    @classmethod
    def check(cls, cfg, num_classes, split) -> None:
        super().check(cfg, num_classes, split)
        if cfg["lambda_f"] > 0 and cfg["threshold_policy"] != "freematch":
            raise UsageError(f"freematch: the fairness term (--lambda-f {cfg['lambda_f']}) reads the freematch "
                             f"policy's statistics, not {cfg['threshold_policy']}'s; use --threshold-policy "
                             f"freematch or --lambda-f 0")

    def train_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        pl = self.pseudo_label(self.teacher_probs(self.views.weak(batch.u), cfg["teacher"]), batch.idx_u)
        loss_sup = self.supervised_loss(batch.l, batch.y_l)
        logits = self.model(self.views.strong(batch.u))
        loss_unsup = self.pseudo_label_ce(logits, pl)
        loss = loss_sup + cfg["lambda_u"] * loss_unsup
        logs = {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(),
                "global_threshold": self.policy.time_p.detach()}
        if cfg["lambda_f"] > 0:
            # the pseudo-label term's switch (--pl-mode) governs it too: a control trains neither
            loss_fair = self.policy.fairness_loss(logits, pl.mask)
            loss = loss + cfg["lambda_f"] * loss_fair
            logs["loss_fair"] = loss_fair.detach()
        return loss, logs
