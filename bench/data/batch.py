"""One step's data as a method sees it: uint8 images on the device, each with its row in the step.

A step's rows are its labeled images (rows 0..B-1) followed by its unlabeled ones (B..B+muB-1).
Random draws are keyed by row (`bench.data.randomness`), so a view of an image does not depend on
which tensor it travels in. The true labels of the unlabeled pool are not here: precision of
pseudo-labels is measured by the engine (`Method.log_pseudo_labels`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Images:
    x: Tensor         # (n, H, W, 3) uint8 on the device
    rows: Tensor      # (n,) int64: each image's row in the step
    size: int         # images in this set over the whole step (its permutation's length)
    universe: int     # rows in the step
    start: int = 0    # the set's first row (labeled images start at 0, unlabeled at B)

    @classmethod
    def whole(cls, x: Tensor) -> "Images":
        """A tensor on its own: rows 0..n-1 of a step of n images."""
        return cls(x, torch.arange(len(x), device=x.device), len(x), len(x))

    def __len__(self) -> int:
        return len(self.x)

    @property
    def positions(self) -> Tensor:
        """Each image's position in its set over the whole step (its row less the set's start)."""
        return self.rows - self.start

    @staticmethod
    def cat(*parts: "Images") -> "Images":
        """Several sets as one (e.g. labeled + unlabeled images for one MAE pass); no partners
        are drawn over such a union, so it has no positions of its own."""
        return Images(torch.cat([p.x for p in parts]), torch.cat([p.rows for p in parts]),
                      sum(p.size for p in parts), parts[0].universe, start=-1)


@dataclass
class Batch:
    """One step's data; views are made by the method."""
    l: Images | None = None      # labeled-train images
    y_l: Tensor | None = None    # (B,) their labels
    u: Images | None = None      # unlabeled images
    idx_u: Tensor | None = None  # their indices in the training set (pseudo-label memory keys)
