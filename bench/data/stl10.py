"""STL-10 (Coates et al., 2011) from its official binary archive `stl10_binary.tar.gz`: 5,000
labeled training images, 8,000 test images and 100,000 unlabeled-only images, 96 x 96 RGB, with
the ten official training folds of 1,000 images each (usable as split files: `--split-file
fold:3`).

Images are stored as 3 x 96 x 96 bytes in column-major order; labels as bytes 1..10. The
unlabeled images join the training array with label -1: they fill the unlabeled pool, never a
label split (bench.data.splits)."""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import UsageError

FILENAME = "stl10_binary.tar.gz"
MD5 = "91f7769df0f17e558f3565bffb0c7dfb"
URL = "http://ai.stanford.edu/~acoates/stl10/"
FOLDER = "stl10_binary"
MEMBERS = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin", "class_names.txt",
           "fold_indices.txt")
SIDE = 96


def is_stl10_source(path: Path) -> bool:
    if path.is_dir():
        return (path / FOLDER / "train_X.bin").is_file() or (path / "train_X.bin").is_file()
    return path.name.startswith("stl10")


def decode(path: Path) -> dict[str, Any]:
    """The archive (or its extracted folder) as the suite's arrays, with the official folds."""
    raw = _members(path)
    missing = [m for m in MEMBERS if m not in raw]
    if missing:
        raise UsageError(f"--data {path}: {', '.join(missing)} missing from the STL-10 archive (truncated?); "
                         f"download {FILENAME} again")
    classes = [c.strip() for c in raw["class_names.txt"].decode().splitlines() if c.strip()]
    train_x, test_x = _images(raw["train_X.bin"], path), _images(raw["test_X.bin"], path)
    unlabeled = _images(raw["unlabeled_X.bin"], path)
    train_y, test_y = _labels(raw["train_y.bin"], path), _labels(raw["test_y.bin"], path)
    if len(train_y) != len(train_x) or len(test_y) != len(test_x) or len(classes) != 10:
        raise UsageError(f"--data {path}: images, labels and class names do not match; is this {FILENAME}?")
    folds = [np.array([int(v) for v in line.split()], dtype=np.int64)
             for line in raw["fold_indices.txt"].decode().splitlines() if line.strip()]
    if any(len(f) and (f.min() < 0 or f.max() >= len(train_x)) for f in folds):
        raise UsageError(f"--data {path}: fold_indices.txt names images outside the training set; download "
                         f"{FILENAME} again")
    return {"classes": classes, "train_x": np.concatenate([train_x, unlabeled]),
            "train_y": np.concatenate([train_y, np.full(len(unlabeled), -1, dtype=np.int64)]),
            "test_x": test_x, "test_y": test_y, "folds": folds, "unlabeled_only": len(unlabeled)}


def _members(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        root = path / FOLDER if (path / FOLDER).is_dir() else path
        return {m: (root / m).read_bytes() for m in MEMBERS if (root / m).is_file()}
    out = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in MEMBERS:
                    out[base] = tar.extractfile(m).read()
    except Exception as e:
        raise UsageError(f"--data {path}: the archive is corrupt or truncated ({type(e).__name__}); download "
                         f"{FILENAME} again") from None
    return out


def _images(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) % (3 * SIDE * SIDE):
        raise UsageError(f"--data {path}: an image file is not a whole number of 3 x 96 x 96 images (truncated?); "
                         f"download {FILENAME} again")
    # column-major 3 x 96 x 96: (N, C, W, H) in memory, so (N, H, W, C) is a transpose away
    x = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3, SIDE, SIDE).transpose(0, 3, 2, 1)
    return np.ascontiguousarray(x)


def _labels(raw: bytes, path: Path) -> np.ndarray:
    y = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 1
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise UsageError(f"--data {path}: labels outside 1..10; is this {FILENAME}?")
    return y
