"""A request to stop at the next step boundary, where the state is consistent.

Ctrl-C (and, for a single process, SIGTERM: a preempted job, `kill`) sets it; the loop then
checkpoints and raises KeyboardInterrupt. Across ranks a request seen by any rank stops every
rank at the same step: the ranks agree at each log event (one all-reduce), and stop there.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import torch

from bench.distributed import all_sum, world


class StopRequest:
    def __init__(self) -> None:
        self.requested = False

    def due(self, step: int, log_every: int) -> bool:
        """Whether to stop before step `step`: at once alone, at a log boundary (where the ranks
        agreed) in a distributed world."""
        return self.requested and (not world().distributed or step % log_every == 0)

    def agree(self) -> None:
        """Across ranks: a request of any rank becomes every rank's."""
        if world().distributed:
            self.requested = float(all_sum(torch.tensor([float(self.requested)]))) > 0

    @contextlib.contextmanager
    def on_signals(self) -> Iterator[None]:
        """Ctrl-C requests a stop; a second Ctrl-C stops at once. A SIGTERM and the SIGINT a
        study worker passes on after it (both arrive when SLURM preempts a job) are one request.
        Across ranks a SIGTERM means another rank failed (bench.distributed.faults)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        seen: set[int] = set()

        def handler(signum, frame):
            if signum in seen:
                raise KeyboardInterrupt
            seen.add(signum)
            self.requested = True

        previous = signal.signal(signal.SIGINT, handler)
        previous_term = None if world().distributed else signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
