"""Image trees too large to decode into memory: ImageNet's ILSVRC-2012 layout, and any image
folder given a fixed side (`--image-side`).

ILSVRC-2012: `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG`; the validation images are the test
set (papers report on them), and classes are the wnids present, sorted (the standard order, so
any subset of the 1,000 classes, e.g. ImageNet-100, is read the same way). A folder that is not a
wnid (`n` and 8 digits) is refused, and so is the flat `val/` of the original tarball. The list
of files, in the order torchvision's ImageFolder lists them (classes sorted, files sorted within
each), is kept with the cache: split files name images by it.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from bench.data.dataset import IMAGE_SUFFIXES
from bench.errors import UsageError
from bench.data.store.build import build_cache, open_cache

WNID = re.compile(r"^n\d{8}$")
DEFAULT_SIDE = 256


def list_split(root: Path, split: str, wnids: bool) -> dict[str, list[str]]:
    """class -> sorted file names under `root/split/<class>/`."""
    base = root / split
    if not base.is_dir():
        raise UsageError(f"--data {root}: no {split}/ folder; {'ImageNet' if wnids else 'an image folder'} needs "
                         f"train/<class>/* and {'val' if wnids else 'test'}/<class>/*")
    loose = sorted(p.name for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        raise UsageError(f"--data {root}: {split}/ holds images directly ({loose[0]}, ...): it is the flat "
                         f"validation set of the ILSVRC tarball; sort it into {split}/<wnid>/ first with the "
                         f"devkit's ground truth (e.g. the widely used valprep.sh)")
    out = {}
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        if wnids and not WNID.match(d.name):
            raise UsageError(f"--data {root}: {split}/{d.name} is not an ImageNet class folder (a wnid such as "
                             f"n01440764); remove it or use --dataset imagefolder")
        out[d.name] = sorted(f.name for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not out or not any(out.values()):
        raise UsageError(f"--data {root}: no images under {split}/<class>/")
    return out


def tree_signature(root: Path, listing: dict[str, dict[str, list[str]]], sizes: bool = True) -> str:
    """sha256 of every file's relative path and (`sizes`) size: cheap at 1.3 M files (no byte is
    read twice), and changed by any file added, removed, renamed or rewritten to another size.
    Without sizes it names the tree's file list, under which a partial build resumes."""
    h = hashlib.sha256()
    for split, classes in listing.items():
        for cls, names in classes.items():
            for name in names:
                rel = f"{split}/{cls}/{name}"
                h.update((f"{rel}\0{(root / rel).stat().st_size}\n" if sizes else f"{rel}\n").encode())
    return h.hexdigest()


def load_tree(root: Path, name: str, cache_dir: Path, side: int, progress: bool = True,
              fixed_classes: list[str] | None = None):
    """A Dataset over the cache of the tree at `root` (built first if needed, resumably)."""
    from bench.data.dataset import Dataset
    if not root.is_dir():
        raise UsageError(f"--data {root}: give the folder holding train/ and "
                         f"{'val/' if name == 'imagenet' else 'test/'} (a tarball is read only without --image-side)")
    wnids, test = name == "imagenet", ("val" if name == "imagenet" else "test")
    listing = {"train": list_split(root, "train", wnids), test: list_split(root, test, wnids)}
    classes = fixed_classes or list(listing["train"])
    if fixed_classes and set(listing["train"]) != set(fixed_classes):
        raise UsageError(f"--data {root}: class folders do not match {name}'s classes; use --dataset imagefolder")
    unknown = sorted(set(listing[test]) - set(classes))
    if unknown:
        raise UsageError(f"--data {root}: {test}/ classes {unknown[:3]} have no train/ folder; make both hold the "
                         f"same classes")
    signature = tree_signature(root, listing)
    final = Path(cache_dir) / "arrays" / f"{name}-{signature[:16]}-s{side}"
    partial = final.with_name(f"{name}-{tree_signature(root, listing, sizes=False)[:16]}-s{side}.partial")
    splits, files = {}, {}
    for split, key in (("train", "train"), (test, "test")):
        rel = [f"{split}/{c}/{f}" for c in classes for f in listing[split].get(c, [])]
        labels = np.array([i for i, c in enumerate(classes) for _ in listing[split].get(c, [])], dtype=np.int64)
        splits[key] = ([str(root / r) for r in rel], labels)
        files[key] = rel
    build_cache(final, partial, splits, classes, files, side, progress=progress)
    arrays = open_cache(final)
    return Dataset(name=name, classes=arrays["classes"], train_x=arrays["train_x"], train_y=arrays["train_y"],
                   test_x=arrays["test_x"], test_y=arrays["test_y"],
                   source_hash=hashlib.sha256(f"{signature}:{side}".encode()).hexdigest(),
                   train_files=arrays["files"]["train"])
