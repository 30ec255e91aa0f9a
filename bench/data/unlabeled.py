"""Unlabeled-only images joining a dataset's unlabeled pool (`--unlabeled-data PATH`): a folder or
tarball of images of any size and layout, each resized (shorter side) and centre-cropped to the
dataset's side, decoded once and cached by content. They join the training array with label -1,
so they enter the unlabeled pool and never a label split; the dataset's hash (and so the split's
and every stage's key) names them, and MAE pretraining, which reads every training image, sees
them too."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.data.dataset import IMAGE_SUFFIXES, Dataset
from bench.errors import UsageError
from bench.io import atomic_write

CACHE_VERSION = "1"


def with_unlabeled(data: Dataset, path: str | Path, cache_dir: Path, progress: bool = True) -> Dataset:
    """`data` with the images under `path` appended to its training array as unlabeled-only."""
    from bench.data.sources import _image_files, content_hash
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"--unlabeled-data {path}: no such file or directory; give a folder or tarball of images")
    if isinstance(data.train_x, np.memmap):
        raise UsageError(f"--unlabeled-data with an on-disk image cache ({data.name}, --image-side) is not "
                         f"supported; use it with a dataset held in memory (CIFAR, STL-10, SVHN, image folders)")
    side = data.train_x.shape[1]
    digest = content_hash(path, cache_dir)
    cached = cache_dir / "arrays" / f"unlabeled-{digest[:16]}-s{side}.npy"
    if cached.is_file():
        extra = np.load(cached)
    else:
        images = [(name, raw) for name, raw in _image_files(path) if Path(name).suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise UsageError(f"--unlabeled-data {path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
        extra = np.stack([_fit(raw, f"--unlabeled-data {path}: {name}", side)
                          for name, raw in tqdm(images, desc="unlabeled images", disable=not progress)])
        try:
            atomic_write(cached, lambda tmp: np.save(open(tmp, "wb"), extra))
        except OSError:
            pass  # an unwritable cache costs speed, not the run
    joined = hashlib.sha256(f"{data.source_hash}+unlabeled:{digest}".encode()).hexdigest()
    return Dataset(name=data.name, classes=data.classes, train_x=np.concatenate([data.train_x, extra]),
                   train_y=np.concatenate([data.train_y, np.full(len(extra), -1, dtype=np.int64)]),
                   test_x=data.test_x, test_y=data.test_y, source_hash=joined, checksum=data.checksum,
                   folds=data.folds, unlabeled_only=data.unlabeled_only + len(extra))


def _fit(raw: bytes, where: str, side: int) -> np.ndarray:
    """Shorter side to `side` (bicubic), then the centre `side` x `side`."""
    from PIL import Image
    from bench.data.sources import _decode_image
    img = Image.fromarray(_decode_image(raw, where))
    w, h = img.size
    scale = side / min(w, h)
    img = img.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(img.crop((left, top, left + side, top + side)), dtype=np.uint8)
