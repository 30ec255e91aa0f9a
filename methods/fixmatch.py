"""FixMatch (Sohn et al., 2020): hard pseudo-labels from the weak view, confident ones train
the strong view.

    L = L_sup + lambda_u * mean_i( 1[max q_i >= tau] * CE(f(strong_i), argmax q_i) ),
    q = softmax(f(weak)) from the online model (or the EMA teacher), without gradient.
"""
from __future__ import annotations

from torch import Tensor

from bench.batch import Batch
from bench.method import Method, register
from bench.options import Option, positive, unit_closed
from bench.pseudo import PseudoLabels, require_reachable, threshold


def unlabeled_options(tau: float, mu: float, lambda_u: float, teacher: str) -> dict[str, Option]:
    """The knobs every threshold-based method shares (FixMatch, Semi-MAE, Semi-ViT)."""
    return {
        "tau": Option(tau, "confidence threshold for admitting a pseudo-label", **unit_closed()),
        "mu": Option(mu, "unlabeled images per labeled image in a step", type=float, **positive()),
        "lambda_u": Option(lambda_u, "weight of the unlabeled loss", type=float, check=lambda v: v >= 0,
                           check_msg=">= 0"),
        "teacher": Option(teacher, "pseudo-label source: the online model or its EMA",
                          choices=("online", "ema")),
    }


@register("fixmatch")
class FixMatch(Method):
    description = "FixMatch: confident weak-view pseudo-labels train the strong view"
    options = unlabeled_options(tau=0.95, mu=7.0, lambda_u=1.0, teacher="online")
    # The paper's supervised branch: plain cross-entropy on weak views. Smoothing would cap the
    # teacher's confidence below tau, and mixing lowers it on clean images.
    recipe = {"label_smoothing": 0.0, "labeled_view": "weak", "mixup_alpha": 0.0, "cutmix_alpha": 0.0}
    uses_unlabeled = True
    pseudo_labels = True

    @classmethod
    def check(cls, cfg, num_classes, split) -> None:
        super().check(cfg, num_classes, split)
        require_reachable(cls.name, cfg, num_classes, "tau")

    def pseudo_label(self, x_weak: Tensor) -> PseudoLabels:
        pl = threshold(self.teacher_probs(x_weak, self.cfg["teacher"]), self.cfg["tau"])
        self.log_pseudo_labels(pl)
        return pl

    def train_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        pl = self.pseudo_label(self.views.weak(batch.u))
        loss_sup = self.supervised_loss(batch.l, batch.y_l)
        loss_unsup = self.hard_pseudo_label_loss(self.views.strong(batch.u), pl)
        loss = loss_sup + self.cfg["lambda_u"] * loss_unsup
        return loss, {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach()}
