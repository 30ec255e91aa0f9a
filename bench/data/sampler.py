"""Index streams: which images a step sees is a function of (seed, stream, step) alone.

A pool of N images is read in epochs, each a fresh permutation drawn from (seed, stream,
epoch) on the host. When the pool holds at least a batch (N >= n), epoch e gives floor(N / n)
batches and the N mod n images left over wait for a later epoch, as a drop-last loader does: no
image appears twice in one step's batch. A pool smaller than a batch is read as one endless
sequence of permutations, so a batch holds every image floor(n / N) or ceil(n / N) times.

Nothing here is state: a resumed run, or any rank of a distributed one, computes the same
indices for step t. The indices are known before the step runs, so a store can read them ahead.
"""
from __future__ import annotations

import numpy as np
import torch

from bench.data.randomness import derive_seed


class IndexStream:
    def __init__(self, pool: np.ndarray, batch: int, seed: int, name: str):
        self.pool = np.asarray(pool, dtype=np.int64)
        self.batch, self.seed, self.name = int(batch), int(seed), name
        self._epochs: dict[int, np.ndarray] = {}

    @property
    def drop_last(self) -> bool:
        return len(self.pool) >= self.batch

    def epoch(self, e: int) -> np.ndarray:
        """The pool in epoch `e`'s order (the last few asked for are kept)."""
        order = self._epochs.pop(e, None)
        if order is None:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "indices", self.name, e))
            order = self.pool[torch.randperm(len(self.pool), generator=g).numpy()]
        self._epochs[e] = order  # most recently used last
        while len(self._epochs) > 4:
            del self._epochs[next(iter(self._epochs))]
        return order

    def at(self, step: int) -> np.ndarray:
        """The indices of step `step` (0-based), on the host."""
        n, size = self.batch, len(self.pool)
        if n == 0 or size == 0:
            return np.zeros(0, dtype=np.int64)
        if self.drop_last:
            per_epoch = size // n
            e, k = divmod(step, per_epoch)
            return self.epoch(e)[k * n:(k + 1) * n]
        start = step * n  # one endless sequence of permutations
        parts = [self.epoch(e)[max(start - e * size, 0):min(start + n - e * size, size)]
                 for e in range(start // size, (start + n - 1) // size + 1)]
        return np.concatenate(parts)
