"""Datasets built here in the official formats: CIFAR python archives and image folders."""
import io
import json
import pickle
import tarfile

import numpy as np
from PIL import Image

from bench.data import CIFAR10_CLASSES
from helpers import REPO

CIFAR100_META = REPO.parent / "shared" / "data" / "cifar100-meta.json"


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def _batch(rng, n, key, num_classes):
    x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    y = rng.integers(0, num_classes, size=n).tolist()
    return {b"data": x, key: y, b"batch_label": b"x"}


def build_cifar10(root, n=12, seed=0):
    """A small archive laid out exactly as cifar-10-python.tar.gz: pickled batches of rows."""
    rng = np.random.default_rng(seed)
    members = {f"data_batch_{i}": _batch(rng, n, b"labels", 10) for i in range(1, 6)}
    members["test_batch"] = _batch(rng, n, b"labels", 10)
    members["batches.meta"] = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    return _write_archive(root / "cifar-10-python.tar.gz", "cifar-10-batches-py", members), members


def build_cifar100(root, n=30, seed=0):
    rng = np.random.default_rng(seed)
    names = (json.loads(CIFAR100_META.read_text())["fine_label_names"] if CIFAR100_META.exists()
             else [f"c{i:03d}" for i in range(100)])
    members = {}
    for split in ("train", "test"):
        b = _batch(rng, n, b"fine_labels", 100)
        b[b"coarse_labels"] = [l // 5 for l in b[b"fine_labels"]]
        members[split] = b
    members["meta"] = {b"fine_label_names": [c.encode() for c in names], b"coarse_label_names": []}
    return _write_archive(root / "cifar-100-python.tar.gz", "cifar-100-python", members), members, names


def _write_archive(path, folder, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            raw = _pickle(obj)
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def rows_to_images(x):
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def write_image_folder(root, classes=("b_cls", "a_cls", "c_cls"), per_class=(4, 2), size=8, seed=0):
    rng = np.random.default_rng(seed)
    expected = {}
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i:03d}.png")
                expected[(split, c, i)] = img
    return expected


def real_cifar10_subset(source, dest, classes, train_per_class, test_per_class):
    """An image-folder tarball of the first images of `classes` in the real CIFAR-10 JPEG copy:
    real photographs, in the layout `--dataset imagefolder` reads, small enough for CI."""
    want = {("train", c): train_per_class for c in classes} | {("test", c): test_per_class for c in classes}
    with tarfile.open(source, "r:gz") as src, tarfile.open(dest, "w") as out:
        for member in src:
            parts = member.name.split("/")
            key = tuple(parts[-3:-1])
            if member.isfile() and want.get(key, 0) > 0:
                want[key] -= 1
                out.addfile(member, src.extractfile(member))
            if not any(want.values()):
                break
    return dest
