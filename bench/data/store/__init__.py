"""Where a run's images live. The trainer gathers uint8 batches by index from a store and never
assumes the dataset is on the device:

- `resident`: the whole array on the device (CIFAR: exactly today's path, as fast and bitwise);
- `streamed`: a memory-mapped uint8 cache on disk, the next step's rows read by a background
  thread into pinned memory while the current step runs; host memory stays a few batches
  whatever the dataset's size.

`--store auto` (the default) keeps a dataset decoded in memory (CIFAR) resident, and an on-disk
cache resident when it fits a memory budget (a quarter of the device's free memory on a GPU, of
the host's available memory on a CPU), streaming it otherwise.
"""
from __future__ import annotations


import numpy as np
import torch

from bench.errors import UsageError
from bench.data.store.resident import ResidentStore
from bench.data.store.streamed import StreamedStore

STORES = ("auto", "resident", "streamed")


def memory_budget(device: torch.device) -> int:
    """Bytes a resident dataset may take: a quarter of what the device has free."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:  # MemAvailable counts the page cache the kernel would give back; "free" pages do not
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kb * 1024 // 4
    except (OSError, StopIteration, ValueError):
        return 4 << 30


def choose(kind: str, nbytes: int, device: torch.device, on_disk: bool = True) -> str:
    """The store `--store kind` resolves to for `nbytes` of images; data decoded in memory
    (`on_disk` False) is already resident in host memory, so `auto` keeps it so."""
    if kind not in STORES:
        raise UsageError(f"--store {kind!r}: use one of {', '.join(STORES)}")
    if kind == "streamed" and not on_disk:
        raise UsageError("--store streamed needs an on-disk image cache; this source is decoded in memory "
                         "(give --image-side to build one, or use --store resident)")
    if kind != "auto":
        return kind
    return "resident" if not on_disk or nbytes <= memory_budget(device) else "streamed"


def open_store(images: np.ndarray, device: torch.device, kind: str):
    """A store over `images` (an array, or a memory-mapped one) of the kind `kind` resolves to."""
    chosen = choose(kind, images.nbytes, device, isinstance(images, np.memmap))
    return ResidentStore(images, device) if chosen == "resident" else StreamedStore(images, device)
