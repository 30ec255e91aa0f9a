"""Atomic checkpoints of the whole training state."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench.io import atomic_write


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to a temporary file and rename it over `path`: a crash keeps the old one."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
