"""Step logs accumulated on the device and read out once per log interval.

A log is a scalar (averaged over the window's steps) or a (numerator, denominator) pair summed
over the window (rates and precisions: a rate logged only on some steps is averaged over those).
Reading the window out is the one host synchronisation of a log interval and, across ranks,
one all-reduce: scalars are averaged over ranks too (every rank holds an equal slice of the
batch), pairs summed, and a non-finite loss on any rank is a non-finite loss on all.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bench.distributed import all_sum, world


class LogWindow:
    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.finite = torch.ones((), dtype=torch.bool, device=device)

    def add(self, loss: Tensor, logs: dict[str, Tensor]) -> None:
        """One step's loss and logs, kept on the device: no host synchronisation."""
        loss = loss.detach().float()
        self.finite &= torch.isfinite(loss)
        for k, v in {"loss": loss, **logs}.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def all_finite(self) -> bool:
        """Whether every loss so far, on every rank, was finite."""
        bad = (~self.finite).float().reshape(1)
        return float(all_sum(bad)) == 0

    def take(self) -> dict[str, float]:
        """The window's values (reduced over ranks), and a fresh window."""
        keys = sorted(self.sums)
        values: dict[str, float] = {}
        if keys:
            flat = all_sum(torch.cat([self.sums[k].reshape(-1) for k in keys]))
            offset, ranks = 0, world().size
            for k in keys:
                n = self.sums[k].numel()
                part = flat[offset:offset + n].tolist()
                offset += n
                if n == 2:  # a ratio of window sums, e.g. pseudo-label precision
                    if part[1] > 0:
                        values[k] = part[0] / part[1]
                else:
                    values[k] = part[0] / (self.count * ranks)
        self.sums, self.count = {}, 0
        return values

    def state_dict(self) -> dict:
        # a checkpoint taken inside a window (Ctrl-C) keeps its partial sums
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {k: v.to(self.device) for k, v in state["sums"].items()}
        self.count = state["count"]
