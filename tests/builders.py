"""Datasets built here in the official formats: CIFAR python archives and image folders."""
import io
import json
import pickle
import tarfile

import numpy as np
from PIL import Image

from bench.data.dataset import CIFAR10_CLASSES
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


WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331")


def write_imagenet_tree(root, wnids=WNIDS, train_per_class=30, val_per_class=8, seed=0, quirks=True):
    """An ILSVRC-2012-layout tree (train/<wnid>/<wnid>_<k>.JPEG, val/<wnid>/ILSVRC2012_val_*.JPEG)
    of JPEGs of varied sizes and aspect ratios, each class a colour so a model can tell them
    apart; with `quirks`, the files real ImageNet holds: a PNG named .JPEG, a CMYK and a greyscale
    JPEG. Returns {relative path: (class index, the RGB image written)}."""
    rng = np.random.default_rng(seed)
    written = {}
    serial = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                w, h = int(rng.integers(40, 160)), int(rng.integers(40, 160))
                base = np.array([(c * 67) % 256, (c * 131 + 40) % 256, (c * 29 + 90) % 256], dtype=np.float32)
                img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
                serial += 1
                name = f"{wnid}_{k}.JPEG" if split == "train" else f"ILSVRC2012_val_{serial:08d}.JPEG"
                path = root / split / wnid / name
                kind = k % 10 if quirks and split == "train" else -1
                im = Image.fromarray(img)
                if kind == 1:
                    im.save(path, format="PNG")                 # a PNG named .JPEG
                elif kind == 2:
                    im = im.convert("CMYK")
                    im.save(path, format="JPEG", quality=90)    # CMYK JPEG
                    img = np.asarray(Image.open(path).convert("RGB"))
                elif kind == 3:
                    im = im.convert("L")
                    im.save(path, format="JPEG", quality=90)    # greyscale JPEG
                    img = np.asarray(Image.open(path).convert("RGB"))
                else:
                    im.save(path, format="JPEG", quality=90)
                written[f"{split}/{wnid}/{name}"] = (c, img)
    return written


STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def build_stl10(root, train_per_class=6, test_per_class=2, unlabeled=30, folds=10, fold_size=12, seed=0):
    """A small stl10_binary.tar.gz in the official layout: 3 x 96 x 96 column-major bytes per
    image, labels as bytes 1..10, class_names.txt and fold_indices.txt. Returns (archive, images):
    the (H, W, 3) images and 0-based labels it holds."""
    rng = np.random.default_rng(seed)
    made = {}
    for part, n in (("train", 10 * train_per_class), ("test", 10 * test_per_class), ("unlabeled", unlabeled)):
        made[part + "_x"] = rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
        if part != "unlabeled":
            made[part + "_y"] = np.repeat(np.arange(10), n // 10)
    members = {
        "train_X.bin": made["train_x"].transpose(0, 3, 2, 1).tobytes(),  # (N, C, W, H): column-major
        "train_y.bin": (made["train_y"] + 1).astype(np.uint8).tobytes(),
        "test_X.bin": made["test_x"].transpose(0, 3, 2, 1).tobytes(),
        "test_y.bin": (made["test_y"] + 1).astype(np.uint8).tobytes(),
        "unlabeled_X.bin": made["unlabeled_x"].transpose(0, 3, 2, 1).tobytes(),
        "class_names.txt": ("\n".join(STL10_CLASSES) + "\n").encode(),
    }
    made["folds"] = [np.sort(rng.permutation(len(made["train_x"]))[:fold_size]) for _ in range(folds)]
    members["fold_indices.txt"] = "".join(" ".join(map(str, f)) + " \n" for f in made["folds"]).encode()
    path = root / "stl10_binary.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(f"stl10_binary/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path, made


def build_svhn(folder, per_part=None, seed=0):
    """SVHN's official MATLAB files (train, test, extra): X (32, 32, 3, N) uint8, y (N, 1) with
    1..10, 10 for the digit 0. Returns the (H, W, 3) images and 0-based labels of each part."""
    from scipy.io import savemat
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for part, n in (per_part or {"train": 40, "test": 20, "extra": 30}).items():
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        digits = np.arange(n) % 10
        savemat(folder / f"{part}_32x32.mat", {"X": x.transpose(1, 2, 3, 0), "y": np.where(digits == 0, 10, digits)[:, None]})
        made[part] = (x, digits)
    return made
