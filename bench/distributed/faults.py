"""A rank that is told to stop (the launcher's SIGTERM after another rank died, a cancelled
job) stops by raising, so the run records FAILED with the reason and keeps its checkpoint."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from bench.distributed.world import world
from bench.errors import PeerLost


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    if not world().distributed or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the failure is recorded undisturbed
        raise PeerLost(f"rank {world().rank} was stopped (SIGTERM): another rank of the run failed or the "
                       f"job was cancelled; resume the run from its last checkpoint")

    previous = signal.signal(signal.SIGTERM, handler)
    _installed.append(handler)
    try:
        yield
    finally:
        _installed.pop()
        signal.signal(signal.SIGTERM, previous)


_installed: list = []


def recording_failure() -> None:
    """A run is recording its failure: a SIGTERM now (the launcher stopping this rank after
    another failed) must not interrupt the record."""
    if _installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
