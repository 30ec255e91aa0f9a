"""Batched prediction and accuracy; shared by the engine and by methods that read validation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class Evaluation:
    acc: float        # top-1 accuracy in percent
    probs: Tensor     # (N, K) softmax probabilities
    labels: Tensor    # (N,)

    def high_confidence_accuracy(self, confidence: float) -> tuple[float, int]:
        """(accuracy over predictions whose max probability exceeds `confidence`, their count);
        0 accuracy when none does."""
        conf, pred = self.probs.max(dim=1)
        sure = conf > confidence
        n = int(sure.sum())
        if n == 0:
            return 0.0, 0
        correct = int((pred[sure] == self.labels[sure]).sum())  # integer counts: 7/10 is exactly 70 %
        return 100.0 * correct / n, n


@torch.no_grad()
def predict(model: nn.Module, x_u8: Tensor, to_input: Callable[[Tensor], Tensor], batch_size: int,
            autocast) -> Tensor:
    """Softmax probabilities of `model` (eval mode) on uint8 images, in batches."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x_u8), batch_size):
        with autocast():
            logits = model(to_input(x_u8[i:i + batch_size]))
        out.append(logits.float().softmax(dim=1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, x_u8: Tensor, y: Tensor, to_input, batch_size: int, autocast) -> Evaluation:
    probs = predict(model, x_u8, to_input, batch_size, autocast)
    acc = 100.0 * int((probs.argmax(1) == y).sum()) / len(y) if len(y) else 0.0
    return Evaluation(acc, probs, y)
