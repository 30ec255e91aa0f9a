"""Batched prediction and accuracy; shared by the engine and by methods that read validation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from bench.distributed import all_sum, shard


@dataclass
class Evaluation:
    """Accuracy of a model on an index set, evaluated in shards across ranks: `probs` and
    `labels` are this rank's shard, every number read from them is reduced over all ranks."""
    acc: float        # top-1 accuracy in percent, over every rank's shard
    probs: Tensor     # (n, K) softmax probabilities of this rank's shard
    labels: Tensor    # (n,)

    def high_confidence_accuracy(self, confidence: float) -> tuple[float, int]:
        """(accuracy over predictions whose max probability exceeds `confidence`, their count);
        0 accuracy when none does."""
        if len(self.probs):
            conf, pred = self.probs.max(dim=1)
            sure = conf > confidence
            mine = torch.stack([(pred[sure] == self.labels[sure]).sum(), sure.sum()]).cpu()
        else:  # a rank whose shard is empty (fewer images than ranks)
            mine = torch.zeros(2, dtype=torch.long)
        counts = all_sum(mine)
        correct, n = (int(c) for c in counts)  # integer counts: 7/10 is exactly 70 %
        if n == 0:
            return 0.0, 0
        return 100.0 * correct / n, n


@torch.no_grad()
def predict(model: nn.Module, images, idx: Tensor, to_input: Callable[[Tensor], Tensor], batch_size: int,
            autocast) -> Tensor:
    """Softmax probabilities of `model` (eval mode) on images `idx` of `images` (a store, or a
    uint8 tensor), in batches; a store reads the next batch while this one is predicted."""
    was_training = model.training
    model.eval()
    starts = range(0, len(idx), batch_size)
    chunks = [idx[i:i + batch_size] for i in starts]
    ahead = idx.cpu().numpy() if hasattr(images, "prefetch") else None  # one host copy, not one sync a batch
    out = []
    for i, chunk in enumerate(chunks):
        if ahead is not None and i + 1 < len(chunks):
            images.prefetch(ahead[starts[i + 1]:starts[i + 1] + batch_size])
        x = images[chunk] if isinstance(images, Tensor) else images.gather(chunk)
        with autocast():
            logits = model(to_input(x))
        out.append(logits.float().softmax(dim=1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, images, idx: Tensor, y: Tensor, to_input, batch_size: int, autocast) -> Evaluation:
    """Accuracy on images `idx` (true labels `y`, one per index). Every image counted once: each
    rank predicts its contiguous share (no padding), and the correct counts are summed."""
    part = shard(len(idx))
    probs = predict(model, images, idx[part], to_input, batch_size, autocast)
    mine = (probs.argmax(1) == y[part]).sum() if len(probs) else torch.zeros((), dtype=torch.long)
    correct = int(all_sum(mine.reshape(1).cpu())[0])
    acc = 100.0 * correct / len(y) if len(y) else 0.0
    return Evaluation(acc, probs, y[part])
