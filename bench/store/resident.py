"""The whole dataset on the device as uint8; a batch is an index into it."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class ResidentStore:
    kind = "resident"

    def __init__(self, images: np.ndarray, device: torch.device):
        # a read-only memory map is copied into memory first (then to the device); an array is used as is
        array = np.array(images) if isinstance(images, np.memmap) else np.ascontiguousarray(images)
        self.images = torch.from_numpy(array).to(device)
        self.device = device

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
