"""AdamW parameter groups (no decay on norms/biases/embeddings, layer-wise lr decay) and the
warm-up + cosine schedule, stepped per optimizer step."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Group parameters by (decay?, layer); each group carries an `lr_scale` for layer decay."""
    no_decay_names = model.no_weight_decay()
    num_layers = model.num_layers
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name not in no_decay_names
        layer = model.layer_id(name)
        g = groups.setdefault((decay, layer), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers + 1 - layer)})
        g["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg["weight_decay"], cfg["layer_decay"])
    fused = next(model.parameters()).is_cuda  # fused AdamW is a CUDA kernel
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), fused=fused)


def lr_at(step: int, cfg: dict[str, Any]) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine or constant."""
    base, total = cfg["lr"], cfg["steps"]
    warmup = min(cfg["warmup_steps"], total)
    if step < warmup:
        return base * (step + 1) / warmup
    if cfg["schedule"] == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return cfg["min_lr"] + (base - cfg["min_lr"]) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
