"""The on-disk image cache of a large source: built once, resumably and atomically.

Every image is decoded by worker processes, converted to RGB (a PNG named .JPEG, CMYK and
greyscale JPEGs included), resized so its shorter side is `side` and centre-cropped to
side x side, and written as one row of a memory-mapped uint8 array (N, side, side, 3); labels
and the file names go beside it. Rows of a fixed size let a store read any batch by index; the
shorter-side resize keeps each object's scale as the papers' evaluation (resize, centre crop)
sees it, and loses only the borders of elongated images. Default side 256: the 224-px protocols
crop from it as torchvision's RandomResizedCrop would from the original (at most the borders of
images wider than 1:1 are out of reach).

The cache is written under a `.partial/` folder named by the tree's file list, with a per-row
done mask and each source file's size: a build that is killed, or stopped by an unreadable file,
continues where it was on the next run (a file replaced by a readable copy is decoded again, the
rest kept); on completion the folder is renamed to the cache's own name in one step. One build
runs at a time per cache (a file lock): concurrent runs wait for it and then read it.
"""
from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.errors import UsageError

CHUNK = 64  # images per worker task: small enough that a killed build loses little


def decode_resized(path: str, side: int) -> np.ndarray:
    """One image as (side, side, 3) uint8: RGB, shorter side `side`, centre crop."""
    from PIL import Image
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (side, side))  # decode at a reduced scale when the file is much larger
        im = im.convert("RGB")
        w, h = im.size
        scale = side / min(w, h)
        nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - side) // 2, (nh - side) // 2
        return np.asarray(im.crop((left, top, left + side, top + side)), dtype=np.uint8)


def _work(task: tuple[int, list[str], int]) -> tuple[int, np.ndarray | None, str | None]:
    start, paths, side = task
    out = np.empty((len(paths), side, side, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            out[i] = decode_resized(p, side)
        except Exception as e:  # noqa: BLE001 - the file, not the worker, is at fault
            return start, None, f"{p}: cannot decode the image ({type(e).__name__}: {str(e)[:120]})"
    return start, out, None


def build_split(paths: list[str], out: Path, name: str, side: int, workers: int, progress: bool) -> None:
    """Write `<out>/<name>_x.npy` row by row from `paths`, skipping rows already done from a
    file of the same size (a replaced file is decoded again)."""
    n = len(paths)
    x_path, done_path, size_path = out / f"{name}_x.npy", out / f"done-{name}.npy", out / f"sizes-{name}.npy"
    sizes = np.array([os.stat(p).st_size for p in paths], dtype=np.int64)
    if x_path.exists() and done_path.exists():
        rows = np.lib.format.open_memmap(x_path, mode="r+")
        done = np.lib.format.open_memmap(done_path, mode="r+")
        if size_path.exists():
            done &= np.load(size_path) == sizes
        else:
            done[:] = False
    else:
        rows = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.uint8, shape=(n, side, side, 3))
        done = np.lib.format.open_memmap(done_path, mode="w+", dtype=np.bool_, shape=(n,))
    np.save(size_path, sizes)
    tasks = [(s, paths[s:s + CHUNK], side) for s in range(0, n, CHUNK) if not done[s:s + CHUNK].all()]
    bar = tqdm(total=n, initial=n - sum(len(t[1]) for t in tasks), desc=f"cache {name} ({side}px)", unit="img",
               disable=not progress, mininterval=1, dynamic_ncols=True)
    error = None
    try:
        with mp.get_context("spawn").Pool(max(1, workers)) as pool:
            for start, block, problem in pool.imap(_work, tasks):
                if problem is not None:
                    error = problem
                    break
                rows[start:start + len(block)] = block
                rows.flush()  # on disk before it is marked done: a done row is a written row
                done[start:start + len(block)] = True
                bar.update(len(block))
    finally:
        bar.close()
        rows.flush()
        done.flush()
    if error is not None:
        raise UsageError(f"{error}; replace it with a readable copy and rerun: the cache build continues where "
                         f"it stopped (removing it changes the file list, and the build starts over)")


def build_cache(final: Path, partial: Path, splits: dict[str, tuple[list[str], np.ndarray]], classes: list[str],
                files: dict[str, list[str]], side: int, workers: int | None = None,
                progress: bool = True) -> Path:
    """Build (or finish building) the cache folder `final` in `partial` from `splits`: name ->
    (image paths, labels). Returns `final`, complete."""
    if (final / "meta.json").exists():
        return final
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial.with_name(partial.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building it: wait, then read what it built
        if (final / "meta.json").exists():
            return final
        partial.mkdir(exist_ok=True)
        workers = workers or max(1, (os.cpu_count() or 2) - 1)
        for name, (paths, labels) in splits.items():
            build_split(paths, partial, name, side, workers, progress)
            np.save(partial / f"{name}_y.npy", labels.astype(np.int64))
        (partial / "files.json").write_text(json.dumps(files))
        (partial / "classes.json").write_text(json.dumps(classes))
        meta = {"side": side, "counts": {k: len(v[0]) for k, v in splits.items()}, "version": 1}
        (partial / "meta.json").write_text(json.dumps(meta))
        for f in partial.iterdir():  # every byte on disk before the folder becomes the cache
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for name in splits:  # build records, dropped only once the cache is complete
            for record in (f"done-{name}.npy", f"sizes-{name}.npy"):
                (final / record).unlink(missing_ok=True)
    return final


def open_cache(final: Path) -> dict:
    """The arrays of a complete cache, memory-mapped (read-only), with classes and file names."""
    meta = json.loads((final / "meta.json").read_text())
    out = {"classes": json.loads((final / "classes.json").read_text()),
           "files": json.loads((final / "files.json").read_text()), "side": meta["side"]}
    for name in meta["counts"]:
        out[f"{name}_x"] = np.load(final / f"{name}_x.npy", mmap_mode="r")
        out[f"{name}_y"] = np.load(final / f"{name}_y.npy")
    return out
