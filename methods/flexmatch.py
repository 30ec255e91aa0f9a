"""FlexMatch (Zhang et al., 2021): FixMatch's loss under curriculum pseudo-labelling.

Each class gets its own threshold, tau scaled by how many unlabeled images the model already
labels confidently as that class (bench.method.thresholds, `flexmatch`): classes it learns slowly are
admitted at lower confidence early, so their pseudo-labels are not starved.

    L = L_sup + lambda_u * mean_i( 1[max q_i >= T_{argmax q_i}] * CE(f(strong_i), argmax q_i) ),
    T_c = tau * beta_c / (2 - beta_c),  beta_c = sigma_c / max(max_c' sigma_c', unlabeled left).
"""
from __future__ import annotations

from torch import Tensor

from bench.method import Batch, Method, pseudo_label_options, register


@register("flexmatch")
class FlexMatch(Method):
    description = "FlexMatch: FixMatch with class-wise curriculum thresholds"
    # USB's values: tau 0.95 as the ceiling of every class threshold, the threshold warm-up on
    options = pseudo_label_options(tau=0.95, mu=7.0, lambda_u=1.0, teacher="online", policy="flexmatch")
    recipe = {"label_smoothing": 0.0, "labeled_view": "weak", "mixup_alpha": 0.0, "cutmix_alpha": 0.0}
    uses_unlabeled = True
    pseudo_labels = True
    threshold_option = "tau"

    def train_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        pl = self.pseudo_label(self.teacher_probs(self.views.weak(batch.u), self.cfg["teacher"]), batch.idx_u)
        loss_sup = self.supervised_loss(batch.l, batch.y_l)
        loss_unsup = self.hard_pseudo_label_loss(self.views.strong(batch.u), pl)
        loss = loss_sup + self.cfg["lambda_u"] * loss_unsup
        return loss, {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(),
                      "class_threshold_min": self.policy.class_thresholds().min().detach()}
