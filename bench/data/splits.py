"""Split manifests: class-balanced, seeded, persisted and reused.

A split is derived from (dataset source, label budget, validation share, pool, seed) only, with
its own RNG, so it never depends on what else a run did. The validation set is carved out of the
labeled budget; the test set is not part of a split at all (it is only ever evaluated).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import UsageError
from bench.io import atomic_write_text


@dataclass
class Split:
    labeled: np.ndarray     # labeled-train indices into the training set
    val: np.ndarray         # validation indices (labeled budget, held out)
    unlabeled: np.ndarray   # unlabeled pool indices
    key: dict[str, Any]     # what the split was derived from

    @property
    def hash(self) -> str:
        blob = json.dumps({"labeled": self.labeled.tolist(), "val": self.val.tolist(),
                           "unlabeled": self.unlabeled.tolist()}, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "hash": self.hash, "labeled": self.labeled.tolist(),
                           "val": self.val.tolist(), "unlabeled": self.unlabeled.tolist()})

    @classmethod
    def from_json(cls, text: str) -> "Split":
        d = json.loads(text)
        split = cls(*(np.asarray(d[k], dtype=np.int64) for k in ("labeled", "val", "unlabeled")),
                    key=d["key"])
        if split.hash != d["hash"]:
            raise ValueError("split manifest hash mismatch")
        return split


def budget_per_class(counts: np.ndarray, label_fraction: float, labels_per_class: int | None) -> np.ndarray:
    """Labeled images per class (validation included)."""
    if labels_per_class is not None:
        too_many = np.flatnonzero(counts < labels_per_class)
        if too_many.size:
            c = int(too_many[0])
            raise UsageError(f"--labels-per-class {labels_per_class} is more than class {c} has "
                             f"({int(counts[c])} images); lower it")
        return np.full_like(counts, labels_per_class)
    return np.maximum(np.round(counts * label_fraction).astype(np.int64), 1)


def make_split(y: np.ndarray, num_classes: int, *, label_fraction: float = 0.1,
               labels_per_class: int | None = None, val_fraction: float = 0.1,
               unlabeled_pool: str = "all", seed: int = 0, source_hash: str = "",
               labeled_from: np.ndarray | None = None, split_file: dict | None = None,
               val_from: str = "labeled", val_per_class: int | None = None) -> Split:
    """Draw a class-balanced split of training labels `y` (deterministic in its arguments).

    The labeled budget is a share of each class, or the images a split file names
    (`labeled_from`). Validation is carved out of that budget (`val_from="labeled"`, the default:
    the run trains on fewer labels than the budget) or drawn from the other training images of
    each class (`"unlabeled"`: their labels are read for validation only, and they leave the
    unlabeled pool), val_fraction of the class's labeled count, at least one, or `val_per_class`
    images of each class."""
    counts = np.bincount(y[y >= 0], minlength=num_classes)  # unlabeled-only images (y = -1) are pool only
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5117]))
    labeled, val = [], []
    if labeled_from is None:
        budget = budget_per_class(counts, label_fraction, labels_per_class)
        chosen = [rng.permutation(np.flatnonzero(y == c))[: budget[c]] for c in range(num_classes)]
    else:
        chosen = [rng.permutation(labeled_from[y[labeled_from] == c]) for c in range(num_classes)]
        budget = np.array([len(m) for m in chosen])
    if val_from == "labeled" and (budget < 2).any():
        c = int(np.argmin(budget))
        raise UsageError(f"the labeled budget leaves {int(budget[c])} image(s) in class {c}; validation carved "
                         f"out of it needs 1 and training 1: raise --label-fraction or --labels-per-class, or "
                         f"take validation from the unlabeled images with --val-from unlabeled")
    for c, members in enumerate(chosen):
        wanted = val_per_class if val_per_class is not None else max(1, int(round(budget[c] * val_fraction)))
        if val_from == "labeled":
            if val_per_class is not None and val_per_class >= budget[c]:
                raise UsageError(f"--val-per-class {val_per_class} leaves no labeled image in class {c} (its budget "
                                 f"is {int(budget[c])}); lower it or use --val-from unlabeled")
            n_val = min(wanted, budget[c] - 1)
            val.append(members[:n_val])
            labeled.append(members[n_val:])
        else:
            n_val = wanted
            rest = rng.permutation(np.setdiff1d(np.flatnonzero(y == c), members))
            if len(rest) < n_val:
                raise UsageError(f"class {c} has {len(rest)} unlabeled image(s), fewer than the {n_val} validation "
                                 f"needs; use --val-from labeled")
            val.append(rest[:n_val])
            labeled.append(members)
    labeled_idx = np.sort(np.concatenate(labeled))
    val_idx = np.sort(np.concatenate(val))
    # Validation images never enter the unlabeled pool, so a gate read on them is held out.
    excluded = val_idx if unlabeled_pool == "all" else np.concatenate([val_idx, labeled_idx])
    unlabeled_idx = np.setdiff1d(np.arange(len(y)), excluded)
    key = {"source_hash": source_hash, "label_fraction": label_fraction,
           "labels_per_class": labels_per_class, "val_fraction": val_fraction,
           "unlabeled_pool": unlabeled_pool, "seed": seed}
    if split_file is not None or val_from != "labeled":  # the keys of earlier manifests stay as they were
        # the file by its content: the same subset at another path is the same split
        key.update(split_file={k: v for k, v in (split_file or {}).items() if k != "file"} or None,
                   val_from=val_from)
    if val_per_class is not None:
        key["val_per_class"] = val_per_class
    return Split(labeled_idx.astype(np.int64), val_idx.astype(np.int64), unlabeled_idx.astype(np.int64), key)


def split_for(cfg: dict[str, Any], y: np.ndarray, num_classes: int, source_hash: str,
              cache_dir: Path, labeled_from: np.ndarray | None = None, split_file: dict | None = None) -> Split:
    """The split for a run's config: loaded from the manifest cache, or drawn and persisted."""
    split = make_split(y, num_classes, label_fraction=cfg["label_fraction"],
                       labels_per_class=cfg["labels_per_class"], val_fraction=cfg["val_fraction"],
                       unlabeled_pool=cfg["unlabeled_pool"], seed=cfg["seed"], source_hash=source_hash,
                       labeled_from=labeled_from, split_file=split_file, val_from=cfg.get("val_from", "labeled"),
                       val_per_class=cfg.get("val_per_class"))
    key_hash = hashlib.sha256(json.dumps(split.key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / "splits" / f"{key_hash}.json"
    if path.exists():
        try:
            stored = Split.from_json(path.read_text())
        except (ValueError, KeyError, json.JSONDecodeError):
            stored = None  # a damaged manifest is replaced by the freshly drawn one below
        if stored is not None and stored.hash == split.hash:
            return stored
        if stored is not None:
            raise UsageError(f"split manifest {path} differs from the split this version draws for the "
                             f"same key; delete it to redraw, or pin the earlier version")
    atomic_write_text(path, split.to_json())
    return split
