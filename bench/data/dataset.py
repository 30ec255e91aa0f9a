"""What a dataset is, once decoded: the one type every source produces and the store reads."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DATASETS = ("cifar10", "cifar100", "imagefolder", "imagenet", "synthetic")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# torchvision ImageFolder's own list: index files (Semi-ViT's CSVs) are positions in its order
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train_x: np.ndarray   # (N, H, W, 3) uint8
    train_y: np.ndarray   # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    source_hash: str      # content hash of the source: keys caches, splits and stage reuse
    train_files: list[str] | None = None  # training images' names in ImageFolder order (split files)
    # a given archive under an official name: its md5 beside the official one (recorded, never refused)
    checksum: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)
