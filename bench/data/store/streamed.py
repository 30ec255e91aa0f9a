"""An on-disk uint8 cache, read a batch at a time, one step ahead.

The index streams know the next step's indices before it runs (`IndexStream.at(step + 1)`), so
the engine asks the store to prefetch them: a background thread reads those rows into a pinned
host buffer while the current step trains, and `gather` of the same indices only copies that
buffer to the device. Rows are read with positioned reads into that buffer (sorted, adjacent
rows in one read), not through a memory map: mapped pages would stay in the process's resident
memory as the run touches the dataset, where these buffers are all it ever holds, about two
batches, whatever the dataset's size.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor


class StreamedStore:
    kind = "streamed"

    def __init__(self, images: np.memmap, device: torch.device):
        self.shape = images.shape
        self.row_bytes = int(np.prod(images.shape[1:]))
        self.offset = images.offset
        self.fd = os.open(images.filename, os.O_RDONLY)
        # rows are read by file position: the array must be a whole cache file, not a slice of one
        # (a slice keeps its parent's offset and would read the parent's first rows)
        if os.fstat(self.fd).st_size != self.offset + self.shape[0] * self.row_bytes:
            os.close(self.fd)
            raise ValueError(f"{images.filename}: the store needs the whole memory-mapped array, not a slice")
        self.device = device
        self.pin = device.type == "cuda"
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-read")
        self.pending: dict[bytes, Future] = {}
        self.lock = threading.Lock()
        self.rows_read = 0
        self.wait_s = 0.0  # time `gather` spent waiting for rows: the step starved by the store

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, idx: np.ndarray) -> Tensor:
        """Rows `idx` as a host tensor (pinned for a GPU): sorted, runs of adjacent rows read at once."""
        out = torch.empty((len(idx), *self.shape[1:]), dtype=torch.uint8, pin_memory=self.pin)
        flat = out.numpy().reshape(len(idx), self.row_bytes)
        order = np.argsort(idx, kind="stable")
        rows = idx[order]
        start = 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            data = os.pread(self.fd, (end - start) * self.row_bytes, self.offset + int(rows[start]) * self.row_bytes)
            flat[order[start:end]] = np.frombuffer(data, dtype=np.uint8).reshape(end - start, self.row_bytes)
            start = end
        self.rows_read += len(idx)
        return out

    def prefetch(self, *indices: np.ndarray) -> None:
        """Start reading each index set in the background (e.g. the next step's batches)."""
        with self.lock:
            for idx in indices:
                if len(idx):
                    idx = np.ascontiguousarray(idx, dtype=np.int64)
                    key = idx.tobytes()
                    if key not in self.pending:
                        self.pending[key] = self.pool.submit(self.read, idx)

    def gather(self, idx: Tensor | np.ndarray) -> Tensor:
        """uint8 (n, H, W, 3) on the device: the prefetched rows if these were read ahead."""
        host = idx.cpu().numpy() if isinstance(idx, Tensor) else np.asarray(idx)
        host = np.ascontiguousarray(host, dtype=np.int64)
        with self.lock:
            future = self.pending.pop(host.tobytes(), None)
        start = time.perf_counter()
        rows = future.result() if future is not None else self.read(host)
        self.wait_s += time.perf_counter() - start
        return rows.to(self.device, non_blocking=self.pin)

    def close(self) -> None:
        """Stop the reader and close the file (idempotent)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass
