"""Pseudo-Label (Lee, 2013), as a plugin: a method written outside the suite, in one file.

The online model labels each unlabeled image's weak view; a confident label trains that same
view (no strong augmentation: what sets FixMatch apart is missing on purpose), with a weight
that ramps up from 0 so early, random labels do not steer the model:

    L = L_sup + lambda_u * w(t) * mean_i( 1[max q_i >= tau] * CE(f(weak_i), argmax q_i) ),
    w(t) = min(1, t / rampup_steps),  q = softmax(f(weak)) without gradient.

Use it with `--plugin examples/pseudo_label.py`:

    bench run pseudo_label --plugin examples/pseudo_label.py --preset smoke
    bench study benchmark --plugin examples/pseudo_label.py --methods fixmatch pseudo_label ...

Everything but the step comes from the core: views, the threshold policy (and so
`--threshold-policy`), the pseudo-label logging the engine turns into admission and precision,
`--pl-mode control` and the oracle, EMA, evaluation, checkpoints and the run record.
"""
from __future__ import annotations

from torch import Tensor

from bench.method import Batch, Method, Option, positive, pseudo_label_options, register


@register("pseudo_label")
class PseudoLabel(Method):
    description = "Pseudo-Label (Lee 2013): confident weak-view labels train the same view, ramped in"
    options = {
        # 0.7, not the usual 0.95: from scratch a ViT admits next to nothing at 0.95 (the threshold_onset study)
        **pseudo_label_options(tau=0.7, mu=1.0, lambda_u=1.0, teacher="online"),
        "rampup_steps": Option(200, "steps over which the unlabeled weight rises linearly from 0 to lambda_u",
                               type=int, **positive()),
    }
    recipe = {"label_smoothing": 0.0, "labeled_view": "weak", "mixup_alpha": 0.0, "cutmix_alpha": 0.0}
    uses_unlabeled = True
    pseudo_labels = True
    threshold_option = "tau"

    def setup(self) -> None:
        self.steps_taken = 0  # the ramp's clock, checkpointed with the method's state

    def train_step(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        weak = self.views.weak(batch.u)
        pl = self.pseudo_label(self.teacher_probs(weak, self.cfg["teacher"]), batch.idx_u)
        ramp = min(1.0, self.steps_taken / self.cfg["rampup_steps"])
        self.steps_taken += 1
        loss_sup = self.supervised_loss(batch.l, batch.y_l)
        loss_unsup = self.hard_pseudo_label_loss(weak, pl)
        loss = loss_sup + self.cfg["lambda_u"] * ramp * loss_unsup
        return loss, {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(),
                      "ramp": loss.detach().new_tensor(ramp)}

    def state_dict(self) -> dict:
        return {"steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        self.steps_taken = state["steps_taken"]
