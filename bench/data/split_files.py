"""Standard label subsets given as files (`--split-file`), validated before anything is written.

Two formats, detected from the content (or named with `--split-format`):
- `simclr`: SimCLR's `1percent.txt` / `10percent.txt` (also VISSL's, TFDS imagenet2012_subset):
  one training file name per line, e.g. `n01440764_10026.JPEG` (or `<class>/<name>` where an
  image folder repeats a name across classes);
- `semivit`: Semi-ViT's index CSVs (`train_1p_index.csv`): a header with an `Index` column, then
  positions into the training images in torchvision ImageFolder order (classes sorted, files
  sorted within each), which is the order the suite lists them in.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np

from bench.errors import UsageError

FORMATS = ("auto", "simclr", "semivit")


def read_split_file(path: str | Path, train_files: list[str] | None, train_y: np.ndarray, classes: list[str],
                    fmt: str = "auto", folds: list | None = None) -> tuple[np.ndarray, dict]:
    """The labeled training indices a split file names, and what it says of itself (format,
    sha256, count, per-class counts); UsageError on any defect. `fold:K` names the dataset's
    official training fold K (STL-10's ten folds of 1,000 images)."""
    if str(path).startswith("fold:"):
        return official_fold(str(path), train_y, classes, folds)
    path = Path(path).expanduser()
    where = f"--split-file {path}"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{where}: cannot read it ({e.strerror}); give the path to the split file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not a text file; give SimCLR's list of file names or Semi-ViT's index CSV") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"{where}: the file is empty; it must name the labeled training images")
    if fmt == "auto":
        fmt = "semivit" if "index" in [c.strip().lower() for c in lines[0].split(",")] else "simclr"
    if fmt == "semivit":
        idx = _semivit_indices(lines, where, len(train_y))
    elif fmt == "simclr":
        idx = _simclr_indices(lines, where, train_files, classes)
    else:
        raise UsageError(f"--split-format {fmt!r}: use one of {', '.join(FORMATS)}")
    uniq, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        dup = int(uniq[counts > 1][0])
        name = train_files[dup] if train_files else f"index {dup}"
        raise UsageError(f"{where}: {name} is listed {int(counts[counts > 1][0])} times; a split names each image once")
    per_class = np.bincount(train_y[idx], minlength=len(classes))
    info = {"file": str(path), "format": fmt, "sha256": hashlib.sha256(raw).hexdigest(), "images": int(len(idx)),
            "classes_with_labels": int((per_class > 0).sum()), "per_class_min": int(per_class.min()),
            "per_class_max": int(per_class.max())}
    return np.sort(idx).astype(np.int64), info


def official_fold(name: str, train_y: np.ndarray, classes: list[str], folds: list | None) -> tuple[np.ndarray, dict]:
    where = f"--split-file {name}"
    if not folds:
        raise UsageError(f"{where}: this dataset has no official folds (STL-10 has ten: fold:0 ... fold:9); "
                         f"give a split file")
    k = name.split(":", 1)[1]
    if not k.isdigit() or int(k) >= len(folds):
        raise UsageError(f"{where}: the folds are fold:0 ... fold:{len(folds) - 1}; pick one of those")
    idx = np.sort(np.asarray(folds[int(k)], dtype=np.int64))
    per_class = np.bincount(train_y[idx], minlength=len(classes))
    info = {"file": name, "format": "fold", "sha256": hashlib.sha256(idx.tobytes()).hexdigest(),
            "images": int(len(idx)), "classes_with_labels": int((per_class > 0).sum()),
            "per_class_min": int(per_class.min()), "per_class_max": int(per_class.max())}
    return idx, info


def _semivit_indices(lines: list[str], where: str, n: int) -> np.ndarray:
    rows = list(csv.reader(lines))
    header = [c.strip() for c in rows[0]]
    matches = [i for i, c in enumerate(header) if c.lower() == "index"]
    if not matches:
        raise UsageError(f"{where}: a Semi-ViT index CSV needs an 'Index' column in its header; the header is {rows[0]}")
    exact = [i for i in matches if header[i] == "Index"]
    if len(exact) != 1 and len(matches) > 1:  # e.g. pandas' reset_index beside Semi-ViT's column
        raise UsageError(f"{where}: the header {rows[0]} has {len(matches)} index columns; keep only Semi-ViT's 'Index'")
    col = exact[0] if exact else matches[0]
    out = []
    for i, row in enumerate(rows[1:], start=2):
        try:
            v = int(row[col])
        except (ValueError, IndexError):
            raise UsageError(f"{where}: line {i} has no integer Index ({','.join(row)[:60]!r}); fix the file") from None
        if not 0 <= v < n:
            raise UsageError(f"{where}: line {i}: index {v} is outside the {n} training images; is this file for "
                             f"this dataset?")
        out.append(v)
    if not out:
        raise UsageError(f"{where}: the CSV has a header but no index; it must name the labeled training images")
    return np.array(out, dtype=np.int64)


def _simclr_indices(lines: list[str], where: str, train_files: list[str] | None, classes: list[str]) -> np.ndarray:
    if train_files is None:
        raise UsageError(f"{where}: this dataset has no file names to look names up in; give Semi-ViT's index CSV "
                         f"(positions into the training images) instead")
    # by bare name (SimCLR's ImageNet lists: names are unique there), or by class/name where an
    # image folder repeats a name across classes
    by_name: dict[str, int] = {}
    repeated: dict[str, list[str]] = {}
    for i, f in enumerate(train_files):
        name = Path(f).name
        if name in by_name:
            repeated.setdefault(name, [Path(train_files[by_name[name]]).parent.name]).append(Path(f).parent.name)
        by_name[name] = i
    by_rel = {"/".join(Path(f).parts[-2:]): i for i, f in enumerate(train_files)}
    known = set(classes)
    out = []
    for i, line in enumerate(lines, start=1):
        entry = line.split()[0]
        name = Path(entry).name
        if name.lower().endswith(".csv") or "," in line:
            raise UsageError(f"{where}: line {i} ({line[:60]!r}) is not a file name; SimCLR's format lists one "
                             f"training image per line (or pass --split-format semivit for an index CSV)")
        rel = "/".join(Path(entry).parts[-2:])
        if "/" in rel and rel in by_rel:
            out.append(by_rel[rel])
            continue
        if name in repeated:
            raise UsageError(f"{where}: line {i}: {name} is the name of images in classes "
                             f"{', '.join(repeated[name][:3])}; write it as <class>/{name}")
        if name not in by_name:
            wnid = name.split("_")[0]
            if "_" in name and wnid not in known:
                raise UsageError(f"{where}: line {i}: {name} is of class {wnid}, which this dataset does not have; "
                                 f"is this file for this dataset?")
            raise UsageError(f"{where}: line {i}: {name} is not among the training images; check the file or --data")
        out.append(by_name[name])
    return np.array(out, dtype=np.int64)


def check_budget(info: dict, n_train: int, label_fraction: float | None, labels_per_class: int | None) -> float:
    """A split file sets the labeled budget: its share of the training images (rounded to four
    significant digits), returned. A label fraction set explicitly (None: not set) must agree with
    it, since every report labels the row by it (a 1 % file under `--label-fraction 0.1` would
    be published as a 10 % row)."""
    where = f"--split-file {info['file']}"
    if labels_per_class is not None:
        raise UsageError(f"{where} and --labels-per-class {labels_per_class} both set the labeled budget; "
                         f"drop --labels-per-class")
    share = float(f"{info['images'] / n_train:.4g}")
    if label_fraction is not None and abs(share / label_fraction - 1) > 0.25:
        raise UsageError(f"{where} names {info['images']:,} images, {100 * share:.3g} % of the {n_train:,} training "
                         f"images, but --label-fraction is {label_fraction:g}; set --label-fraction {share:.2g} "
                         f"or give the file of that budget")
    return share
