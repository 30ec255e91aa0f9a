"""Atomic checkpoints of the whole training state."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench.io import atomic_write


class _Writer:
    """A file for torch.save that keeps the exception of a failed write: torch's zip writer
    turns it into an opaque RuntimeError ("unexpected pos ..."), hiding a full disk or a Ctrl-C."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except BaseException as e:  # also a second Ctrl-C landing inside the write
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _save_to(tmp: str, state: dict[str, Any]) -> None:
    with open(tmp, "wb") as f:
        writer = _Writer(f)
        try:
            torch.save(state, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to a temporary file and rename it over `path`: a crash keeps the old one."""
    atomic_write(path, lambda tmp: _save_to(tmp, state))


def load(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def saved_step(path: str | Path) -> int:
    """The step a checkpoint was taken at; memory-mapped, so its tensors are not read."""
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["step"])
