"""What a dataset is, once decoded: the one type every source produces and the store reads."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DATASETS = ("cifar10", "cifar100", "stl10", "svhn", "svhn_extra", "imagefolder", "imagenet", "synthetic")
NO_FLIP = ("svhn", "svhn_extra")  # digits are not mirror-symmetric
# the official datasets' classes and test images, for what is planned before any data is read
OFFICIAL_SIZES = {"cifar10": (10, 10_000), "cifar100": (100, 10_000), "stl10": (10, 8_000),
                  "svhn": (10, 26_032), "svhn_extra": (10, 26_032), "imagenet": (1000, 50_000)}
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
    folds: list | None = None     # official training folds (STL-10), usable as `--split-file fold:K`
    unlabeled_only: int = 0       # the last this many training images have no label (y = -1)

    @property
    def hflip(self) -> bool:
        """Whether the views may mirror an image."""
        return self.name not in NO_FLIP

    @property
    def labeled_pool(self) -> np.ndarray:
        """Indices of the training images that have a label."""
        return np.flatnonzero(self.train_y >= 0)

    @property
    def num_classes(self) -> int:
        return len(self.classes)
