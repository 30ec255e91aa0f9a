"""The whole dataset on the device as uint8; a batch is an index into it."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class ResidentStore:
    kind = "resident"

    def __init__(self, images: np.ndarray, device: torch.device):
        self.device = device
        if isinstance(images, np.memmap):
            # a cache on disk is copied to the device in slices: host memory holds one slice, not a
            # second copy of the dataset
            self.images = torch.empty(images.shape, dtype=torch.uint8, device=device)
            step = max(1, (256 << 20) // max(1, images[:1].nbytes))
            for s in range(0, len(images), step):
                self.images[s:s + step].copy_(torch.from_numpy(np.array(images[s:s + step])))  # one slice in RAM
        else:
            self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)

    def __len__(self) -> int:
        return len(self.images)

    def gather(self, idx: Tensor | np.ndarray) -> Tensor:
        """uint8 (n, H, W, 3) on the device."""
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx).to(self.device)
        return self.images[idx]

    def prefetch(self, *indices: np.ndarray) -> None:
        """Nothing to read ahead: every image is already on the device."""

    def close(self) -> None:
        pass
