"""Seeded index streams: epoch-style permutations whose position is part of the checkpoint."""
from __future__ import annotations

import torch
from torch import Tensor


class IndexStream:
    """Yields batches of indices from `pool`, each epoch a fresh permutation (no replacement).

    Lives on the data's device and draws from the run's generator, so a resumed run continues
    mid-epoch exactly where the interrupted one stopped.
    """

    def __init__(self, pool: Tensor, generator: torch.Generator):
        self.pool = pool
        self.generator = generator
        self.order = self._permute()
        self.pos = 0

    def _permute(self) -> Tensor:
        perm = torch.randperm(len(self.pool), generator=self.generator, device=self.pool.device)
        return self.pool[perm]

    def next(self, n: int) -> Tensor:
        parts, need = [], n
        while need > 0:
            if self.pos == len(self.order):
                self.order, self.pos = self._permute(), 0
            take = min(need, len(self.order) - self.pos)
            parts.append(self.order[self.pos:self.pos + take])
            self.pos += take
            need -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state_dict(self) -> dict:
        return {"order": self.order.cpu(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.order = state["order"].to(self.pool.device)
        self.pos = int(state["pos"])
