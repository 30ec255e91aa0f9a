"""FixMatch (Sohn et al., 2020): hard pseudo-labels from the weak view, confident ones train
the strong view.

    L = L_sup + lambda_u * mean_i( 1[max q_i >= tau] * CE(f(strong_i), argmax q_i) ),
    q = softmax(f(weak)) from the online model (or the EMA teacher), without gradient.

`--threshold-policy` swaps the fixed tau for an adaptive one (bench.method.thresholds).
"""
from __future__ import annotations

from torch import Tensor

from bench.method import Batch, Method, pseudo_label_options, register


@register("fixmatch")
class FixMatch(Method):
    description = "FixMatch: confident weak-view pseudo-labels train the strong view"
    options = pseudo_label_options(tau=0.95, mu=7.0, lambda_u=1.0, teacher="online")
    # The paper's supervised branch: plain cross-entropy on weak views. Smoothing would cap the
    # teacher's confidence below tau, and mixing lowers it on clean images.
    recipe = {"label_smoothing": 0.0, "labeled_view": "weak", "mixup_alpha": 0.0, "cutmix_alpha": 0.0}
    uses_unlabeled = True
    pseudo_labels = True
    threshold_option = "tau"

    def train_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        pl = self.pseudo_label(self.teacher_probs(self.views.weak(batch.u), self.cfg["teacher"]), batch.idx_u)
        loss_sup = self.supervised_loss(batch.l, batch.y_l)
        loss_unsup = self.hard_pseudo_label_loss(self.views.strong(batch.u), pl)
        loss = loss_sup + self.cfg["lambda_u"] * loss_unsup
        return loss, {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach()}
