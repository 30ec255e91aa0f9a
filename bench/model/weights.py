"""Weights handed from one stage (or file) to the next, and their fingerprints.

`transfer` loads what carries over with an explicit key mapping; `digest` names a set of tensors
so that a run record says which weights it started from, and a test can check they arrived.
"""
from __future__ import annotations

import hashlib

import torch


def transfer(state: dict[str, torch.Tensor], model: torch.nn.Module, keep_head: bool) -> list[str]:
    """Load encoder (and, if `keep_head`, classifier) weights with an explicit key mapping:
    every encoder weight must load; the MAE decoder (and the MAE branch's latent norm) loads
    where both sides have one, so a method that reconstructs continues the pretraining's
    decoder. A head that does not carry over is re-drawn as MAE and Semi-ViT fine-tune from a
    pretrained encoder: truncated normal with std 2e-5, zero bias, so the first steps do not
    disturb the encoder. Returns the parts loaded besides the encoder."""
    own = model.state_dict()
    take = {k: v for k, v in state.items() if k.startswith("vit.") and (keep_head or not k.startswith("vit.head"))}
    missing = [k for k in own if k.startswith("vit.") and k not in take and not k.startswith("vit.head")]
    if missing:
        raise RuntimeError(f"stage weights lack encoder parameters {missing[:3]}")
    parts = ["head"] if keep_head else []
    for part in ("mae_norm.", "decoder."):
        mine = [k for k in own if k.startswith(part)]
        if mine and all(k in state for k in mine):
            take.update({k: state[k] for k in mine})
            parts.append(part.rstrip("."))
    result = model.load_state_dict(take, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    head = model.vit.head
    if not keep_head and isinstance(head, torch.nn.Linear):
        with torch.no_grad():
            torch.nn.init.trunc_normal_(head.weight, std=2e-5)
            torch.nn.init.zeros_(head.bias)
    return parts


def digest(state: dict[str, torch.Tensor], part: str = "encoder") -> str:
    """sha256 of the encoder tensors (`part="head"`: the classifier head's, `"decoder"`: the MAE
    decoder's) of a state dict: the run record names the weights a stage handed on, and a test
    can check they arrived."""
    def wanted(k: str) -> bool:
        if part == "decoder":
            return k.startswith("decoder.")
        return k.startswith("vit.") and k.startswith("vit.head") == (part == "head")
    h = hashlib.sha256()
    for k in sorted(state):
        if wanted(k):
            h.update(k.encode())
            h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
