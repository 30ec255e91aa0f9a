"""Datasets: official CIFAR archives, image-folder trees, and learnable synthetic images.

Every source is decoded once into uint8 arrays (N, H, W, 3) and cached under
`<cache>/arrays/<name>-<hash>.npz`, keyed by the source's content hash: the second load reads
one file. Bad input (missing, corrupt or truncated data) raises a one-line UsageError.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from bench.data import stl10, svhn
from bench.data.dataset import CIFAR10_CLASSES, DATASETS, IMAGE_SUFFIXES, Dataset
from bench.errors import UsageError
from bench.io import atomic_write, ensure_writable_dir, file_digest

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class Archive:
    filename: str
    md5: str
    folder: str          # top-level folder inside the archive
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    meta: str            # holds the class names
    names_key: bytes


CIFAR = {
    "cifar10": Archive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
                       tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels", "batches.meta", b"label_names"),
    "cifar100": Archive("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
                        ("train",), ("test",), b"fine_labels", "meta", b"fine_label_names"),
}
CACHE_VERSION = "1"  # bump when decoding changes, so stale caches are not reused


def default_cache_dir() -> Path:
    return Path(os.environ.get("SSVIT_CACHE") or Path.home() / ".cache" / "ssvit-bench")


def prepare_cache_dir(cache_dir: str | Path | None, option: str = "--cache-dir PATH") -> Path:
    """The cache directory (given, else the default), created and checked writable. `option` is
    how the calling command sets it, named in the error."""
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        ensure_writable_dir(path)
    except OSError as e:
        raise UsageError(f"cache directory {path} is not writable ({e.strerror}); pass {option} "
                         f"or set $SSVIT_CACHE to a writable place") from None
    return path


def load_dataset(name: str, data: str | Path | None, cache_dir: str | Path,
                 synthetic: dict[str, int] | None = None, progress: bool = True,
                 image_side: int | None = None) -> Dataset:
    """Load dataset `name` from `data` (a path; None = download CIFAR / generate synthetic).
    ImageNet, and an image folder given `image_side`, are cached on disk at a fixed side and
    come back memory-mapped (`bench.data.imagenet`)."""
    cache_dir = Path(cache_dir)
    if name not in DATASETS:
        raise UsageError(f"unknown dataset '{name}'; use one of {', '.join(DATASETS)}")
    if name == "synthetic":
        return make_synthetic(**(synthetic or {}))
    if name == "imagenet" or (name == "imagefolder" and image_side):
        from bench.data.imagenet import DEFAULT_SIDE, load_tree
        if data is None:
            raise UsageError(f"--dataset {name} needs --data PATH to the folder holding train/ and "
                             f"{'val/' if name == 'imagenet' else 'test/'}; nothing is downloaded")
        path = Path(data).expanduser()
        if not path.exists():
            raise UsageError(f"--data {data}: no such file or directory; give the path to the dataset")
        return load_tree(path, name, cache_dir, image_side or DEFAULT_SIDE, progress)
    if data is None:
        if name == "imagefolder":
            raise UsageError("--dataset imagefolder needs --data PATH to a folder (or .tar/.tar.gz) "
                             "holding train/<class>/* and test/<class>/*")
        data = download(name, cache_dir, progress)
    if name in ("svhn", "svhn_extra") and not Path(data).expanduser().is_dir():
        raise UsageError(f"--data {data}: SVHN is read from the folder holding its official .mat files "
                         f"({', '.join(f for f, _ in svhn.FILES.values())}); give that folder")
    path = Path(data).expanduser()
    if not path.exists():
        raise UsageError(f"--data {data}: no such file or directory; give the path to the dataset")
    if path.is_file() and not _is_tarfile(path) and name not in ("svhn", "svhn_extra"):
        raise UsageError(f"--data {data}: not a readable tar archive (corrupt or truncated?); "
                         f"download it again or give the extracted folder")
    source_hash = content_hash(path, cache_dir)
    checksum = official_checksum(name, path, cache_dir)
    cached = cache_dir / "arrays" / f"{name}-{source_hash[:16]}.npz"
    if cached.is_file():
        try:
            return _read_cache(cached, name, source_hash, checksum)
        except (OSError, ValueError, KeyError, EOFError):
            pass  # an unreadable cache is rebuilt below
    if name in CIFAR and _is_cifar_source(path, CIFAR[name]):
        arrays = _decode_cifar(path, CIFAR[name], name)
    elif name == "stl10" and stl10.is_stl10_source(path):
        arrays = stl10.decode(path)
    elif name in ("svhn", "svhn_extra"):
        arrays = svhn.decode(path, name)
    else:
        fixed = list(CIFAR10_CLASSES) if name == "cifar10" else None
        arrays = _decode_image_folder(path, name, fixed, 100 if name == "cifar100" else None, progress)
    _write_cache(cached, arrays)
    return Dataset(name=name, source_hash=source_hash, checksum=checksum, **arrays)


def load_for(cfg: dict[str, Any], cache_dir: str | Path, progress: bool = True) -> Dataset:
    """The dataset of a resolved run config, with its unlabeled-only images (`--unlabeled-data`)."""
    data = load_dataset(cfg["dataset"], cfg["data"], cache_dir, synthetic=synthetic_params(cfg), progress=progress,
                        image_side=cfg.get("image_side"))
    if cfg.get("unlabeled_data"):
        from bench.data.unlabeled import with_unlabeled
        data = with_unlabeled(data, cfg["unlabeled_data"], Path(cache_dir), progress)
    return data


def synthetic_params(cfg: dict[str, Any]) -> dict[str, int]:
    return {"classes": cfg["synthetic_classes"], "size": cfg["synthetic_size"],
            "train_per_class": cfg["synthetic_train_per_class"],
            "test_per_class": cfg["synthetic_test_per_class"], "seed": 0}


# -- downloads -------------------------------------------------------------------------------
def download(name: str, cache_dir: Path, progress: bool = True) -> Path:
    """The official archive of `name` in `<cache>/downloads` (SVHN: the folder of its .mat files),
    fetched and md5-checked if absent."""
    if name == "stl10":
        return _download_file(stl10.URL, stl10.FILENAME, stl10.MD5, cache_dir / "downloads", progress)
    if name in ("svhn", "svhn_extra"):
        folder = cache_dir / "downloads" / "svhn"
        for part in svhn.parts_of(name):
            _download_file(svhn.URL, *svhn.FILES[part], folder, progress, also=" (its folder, for SVHN)")
        return folder
    if name not in CIFAR:
        raise UsageError(f"--dataset {name} is not downloaded; give --data PATH")
    spec = CIFAR[name]
    return _download_file(CIFAR_URL, spec.filename, spec.md5, cache_dir / "downloads", progress,
                          also=" (or an image-folder copy)")


def _download_file(base: str, filename: str, md5: str, folder: Path, progress: bool, also: str = "") -> Path:
    """`folder/filename`, fetched from `base` (or from $SSVIT_MIRROR, one mirror serving every
    official file name) unless a copy with the right md5 is already there."""
    dest = folder / filename
    if dest.is_file() and file_digest(dest, "md5") == md5:
        return dest
    mirror = os.environ.get("SSVIT_MIRROR")
    fetch((mirror or base).rstrip("/") + "/" + filename, dest, md5, progress,
          hint=f"offline? pass --data PATH to {filename}{also} instead")
    return dest


def fetch(url: str, dest: Path, md5: str, progress: bool = True, hint: str = "") -> None:
    """Download `url` to `dest` atomically, verifying its md5; UsageError on failure."""
    def write(tmp: str) -> None:
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}",
                          disable=not progress) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise UsageError(f"cannot download {url}: {reason}; {hint}".rstrip("; ")) from None
        if file_digest(tmp, "md5") != md5:
            raise UsageError(f"checksum mismatch for {url} (expected md5 {md5}); the download is "
                             f"corrupt: retry, or {hint or 'pass --data PATH'}")
    atomic_write(dest, write)


def official_checksum(name: str, path: Path, cache_dir: Path) -> dict | None:
    """A given file named as `name`'s official archive: its md5 against the official one. A
    mismatch is a fact for the record (a rebuilt or trimmed archive), not an error."""
    spec = CIFAR.get(name)
    if spec is None or not path.is_file() or path.name != spec.filename:
        return None
    md5 = content_hash(path, cache_dir, "md5")
    return {"file": spec.filename, "md5": md5, "official_md5": spec.md5, "official": md5 == spec.md5}


def content_hash(path: Path, cache_dir: Path, algorithm: str = "sha256") -> str:
    """The digest of a file's bytes or of a folder's (relative path, bytes) pairs. Memoised by
    (path, size, mtime) so an unchanged source is not re-read."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    signature = json.dumps([str(path.resolve())] + [(str(p), p.stat().st_size, p.stat().st_mtime_ns)
                                                    for p in files] + ([algorithm] if algorithm != "sha256" else []))
    memo = cache_dir / "hashes" / hashlib.sha256(signature.encode()).hexdigest()
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.new(algorithm)
    for p in files:
        h.update(str(p.relative_to(path)).encode() if p != path else b"")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    digest = h.hexdigest()
    atomic_write(memo, lambda tmp: Path(tmp).write_text(digest))
    return digest


# -- the official CIFAR python format --------------------------------------------------------
def _is_cifar_source(path: Path, spec: Archive) -> bool:
    if path.is_dir():
        return (path / spec.folder).is_dir() or (path / spec.test[0]).is_file()
    try:
        with tarfile.open(path) as tar:
            return any(m.name.rstrip("/").endswith(f"{spec.folder}/{spec.test[0]}") for m in tar)
    except Exception as e:
        raise UsageError(f"--data {path}: the archive is corrupt or truncated ({type(e).__name__}); "
                         f"download {spec.filename} again") from None


def _is_tarfile(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except Exception:
        return False


def _cifar_members(path: Path, spec: Archive) -> Iterator[tuple[str, bytes]]:
    wanted = set(spec.train + spec.test + (spec.meta,))
    if path.is_dir():
        root = path / spec.folder if (path / spec.folder).is_dir() else path
        for member in sorted(wanted):
            if not (root / member).is_file():
                raise UsageError(f"--data {path}: {member} is missing from the CIFAR folder; "
                                 f"re-extract {spec.filename}")
            yield member, (root / member).read_bytes()
        return
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in wanted:
                    yield base, tar.extractfile(m).read()
    except Exception as e:
        raise UsageError(f"--data {path}: the archive is corrupt or truncated ({type(e).__name__}); "
                         f"download {spec.filename} again") from None


def _decode_cifar(path: Path, spec: Archive, name: str) -> dict[str, Any]:
    parts: dict[str, dict] = {}
    classes = None
    for member, raw in _cifar_members(path, spec):
        if member == spec.meta:
            try:
                classes = [n.decode() for n in pickle.loads(raw, encoding="bytes")[spec.names_key]]
            except Exception:
                raise UsageError(f"--data {path}: {member} is not CIFAR metadata; the archive is "
                                 f"corrupt, download {spec.filename} again") from None
            continue
        try:
            batch = pickle.loads(raw, encoding="bytes")
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            y = np.asarray(batch[spec.label_key], dtype=np.int64)
        except Exception as e:
            raise UsageError(f"--data {path}: {member} is not a CIFAR batch ({type(e).__name__}); "
                             f"the archive is corrupt, download {spec.filename} again") from None
        parts[member] = {"x": x, "y": y}
    missing = [m for m in spec.train + spec.test if m not in parts] + ([spec.meta] if classes is None else [])
    if missing:
        raise UsageError(f"--data {path}: {', '.join(missing)} missing (truncated archive?); "
                         f"download {spec.filename} again")
    num_classes = 10 if name == "cifar10" else 100
    if len(classes) != num_classes:
        raise UsageError(f"--data {path}: {len(classes)} class names in {spec.meta}, {name} has "
                         f"{num_classes}; is this the {spec.filename} archive?")
    cat = lambda keys, k: np.ascontiguousarray(np.concatenate([parts[m][k] for m in keys]))
    arrays = {"classes": classes, "train_x": cat(spec.train, "x"), "train_y": cat(spec.train, "y"),
              "test_x": cat(spec.test, "x"), "test_y": cat(spec.test, "y")}
    for key in ("train_y", "test_y"):
        if arrays[key].min() < 0 or arrays[key].max() >= num_classes:
            raise UsageError(f"--data {path}: labels outside 0..{num_classes - 1}; is this the "
                             f"{spec.filename} archive?")
    return arrays


# -- image folders: train/<class>/*, test/<class>/* ------------------------------------------
def _image_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """(relative path, bytes) of every file under `path` (a folder or a tar archive)."""
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                yield p.relative_to(path).as_posix(), p.read_bytes()
        return
    try:
        with tarfile.open(path, "r|*") as tar:  # streamed: one pass over a compressed tarball
            for m in tar:
                if m.isfile():
                    yield m.name, tar.extractfile(m).read()
    except Exception as e:
        raise UsageError(f"--data {path}: the archive is corrupt or truncated ({type(e).__name__}: "
                         f"{e}); recreate it".replace("\n", " ")) from None


def _split_member(name: str) -> tuple[str, str] | None:
    """('train'|'test', class) for 'train/<class>/<file>' at any depth of leading folders."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    for i in range(len(parts) - 2):
        if parts[i] in ("train", "test") and i + 3 == len(parts):
            return parts[i], parts[i + 1]
    return None


def _decode_image(raw: bytes, where: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:
        raise UsageError(f"{where}: cannot decode the image ({e}); remove or replace the file") from None


def _decode_image_folder(path: Path, name: str, fixed_classes: list[str] | None,
                         expect_classes: int | None, progress: bool) -> dict[str, Any]:
    found: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    for member, raw in _image_files(path):
        where = _split_member(member)
        if where and Path(member).suffix.lower() in IMAGE_SUFFIXES:
            found[where[0]].append((where[1], member, raw))
    train_classes = sorted({c for c, _, _ in found["train"]})
    if not train_classes:
        raise UsageError(f"--data {path}: no images under train/<class>/; an image folder needs "
                         f"train/<class>/* and test/<class>/*")
    if not found["test"]:
        raise UsageError(f"--data {path}: no images under test/<class>/; add a test split")
    classes = fixed_classes or train_classes  # sorted names: also CIFAR-100's official order
    if fixed_classes and set(train_classes) != set(fixed_classes):
        raise UsageError(f"--data {path}: class folders {train_classes[:4]}... do not match {name}'s "
                         f"classes {fixed_classes[:4]}...; use --dataset imagefolder")
    if expect_classes and len(classes) != expect_classes:
        raise UsageError(f"--data {path}: {len(classes)} class folders, {name} has {expect_classes}; "
                         f"use --dataset imagefolder")
    unknown = sorted({c for c, _, _ in found["test"]} - set(classes))
    if unknown:
        raise UsageError(f"--data {path}: test classes {unknown[:3]} have no train folder; "
                         f"make test/ and train/ hold the same classes")
    index = {c: i for i, c in enumerate(classes)}
    arrays: dict[str, Any] = {"classes": list(classes)}
    total = len(found["train"]) + len(found["test"])
    shape = None
    with tqdm(total=total, desc=f"decode {path.name}", unit="img", disable=not progress, mininterval=1) as bar:
        for split in ("train", "test"):
            items = sorted(found[split], key=lambda t: (index[t[0]], t[1]))  # order-independent
            images = []
            for cls, member, raw in items:
                img = _decode_image(raw, f"--data {path}: {member}")
                if shape is None:
                    shape = img.shape
                elif img.shape != shape:
                    raise UsageError(f"--data {path}: {member} is {img.shape[1]}x{img.shape[0]}, other "
                                     f"images {shape[1]}x{shape[0]}; resize all images to one size")
                images.append(img)
                bar.update()
            arrays[f"{split}_x"] = np.stack(images)
            arrays[f"{split}_y"] = np.array([index[c] for c, _, _ in items], dtype=np.int64)
    return arrays


# -- synthetic: class-conditional smooth colour patterns ---------------------------------------
def make_synthetic(classes: int = 10, size: int = 32, train_per_class: int = 100,
                   test_per_class: int = 20, seed: int = 0) -> Dataset:
    """Each class is a random smooth colour pattern; an image is its class pattern, shifted by a
    few pixels, with per-image brightness and pixel noise. Learnable by a tiny ViT in seconds,
    not by a colour histogram alone (patterns share their palette statistics)."""
    if classes < 2 or size < 8:
        raise UsageError("synthetic data needs at least 2 classes and 8-pixel images; raise "
                         "--synthetic-classes / --synthetic-size")
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, size=(classes, 3, 4, 4)).astype(np.float32)
    cells = np.linspace(0, 3, size, dtype=np.float32)  # bilinear upsampling of the 4x4 pattern
    i0 = np.minimum(cells.astype(int), 2)
    f = cells - i0
    rows = coarse[:, :, i0] * (1 - f)[None, None, :, None] + coarse[:, :, i0 + 1] * f[None, None, :, None]
    protos = rows[..., i0] * (1 - f) + rows[..., i0 + 1] * f  # (C, 3, size, size)

    def sample(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(classes), per_class)
        n, shift = len(y), max(1, size // 8)
        dy, dx = rng.integers(-shift, shift + 1, size=(2, n))
        r = (np.arange(size)[None, :] - dy[:, None]) % size
        c = (np.arange(size)[None, :] - dx[:, None]) % size
        imgs = protos[y][np.arange(n)[:, None, None, None], np.arange(3)[None, :, None, None],
                         r[:, None, :, None], c[:, None, None, :]]
        imgs = imgs * rng.uniform(0.7, 1.3, size=(n, 1, 1, 1)) + rng.normal(0, 0.08, imgs.shape)
        x = np.clip(imgs * 255, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x), y.astype(np.int64)

    train_x, train_y = sample(train_per_class)
    test_x, test_y = sample(test_per_class)
    params = dict(classes=classes, size=size, train_per_class=train_per_class,
                  test_per_class=test_per_class, seed=seed, version=CACHE_VERSION)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    return Dataset("synthetic", [f"class_{i}" for i in range(classes)], train_x, train_y, test_x,
                   test_y, digest)


# -- the uint8 cache ---------------------------------------------------------------------------
def _write_cache(path: Path, arrays: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            extra = {f"fold_{i}": fold for i, fold in enumerate(arrays.get("folds") or [])}
            np.savez(f, classes=np.array(arrays["classes"]), version=np.array(CACHE_VERSION),
                     unlabeled_only=np.array(arrays.get("unlabeled_only", 0)),
                     **{k: arrays[k] for k in ("train_x", "train_y", "test_x", "test_y")}, **extra)
    try:
        atomic_write(path, write)
    except OSError as e:  # an unwritable cache costs speed, not the run
        print(f"warning: cannot write the dataset cache {path}: {e}")


def _read_cache(path: Path, name: str, source_hash: str, checksum: dict | None = None) -> Dataset:
    with np.load(path) as z:
        if str(z["version"]) != CACHE_VERSION:
            raise ValueError("stale cache")
        folds = [z[f"fold_{i}"] for i in range(10) if f"fold_{i}" in z.files] or None
        return Dataset(name, [str(c) for c in z["classes"]], z["train_x"], z["train_y"], z["test_x"],
                       z["test_y"], source_hash, checksum=checksum, folds=folds,
                       unlabeled_only=int(z["unlabeled_only"]) if "unlabeled_only" in z.files else 0)
