"""Cross-rank reductions the core needs; each is the identity in a world of one.

Global-batch semantics: every rank holds an equal, contiguous slice of the step's global batch
(its rows), so a concatenation in rank order is the global batch in row order.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bench.distributed.world import world


def _wire(t: Tensor) -> Tensor:
    """A copy of `t` where the backend moves data: the rank's GPU for NCCL, host memory for Gloo."""
    device = torch.device("cuda", torch.cuda.current_device()) if world().backend == "nccl" else torch.device("cpu")
    return t.detach().to(device, copy=True).contiguous()


def all_sum(t: Tensor) -> Tensor:
    """The sum of `t` over ranks (a new tensor on `t`'s device; `t` itself untouched)."""
    if not world().distributed:
        return t
    out = _wire(t)
    dist.all_reduce(out)
    return out.to(t.device)


def all_cat(t: Tensor) -> Tensor:
    """`t` of every rank concatenated along dim 0 in rank order (equal shapes on every rank)."""
    w = world()
    if not w.distributed:
        return t
    mine = _wire(t)
    parts = [torch.empty_like(mine) for _ in range(w.size)]
    dist.all_gather(parts, mine)
    return torch.cat(parts).to(t.device)


def all_cat_uneven(t: Tensor) -> Tensor:
    """As `all_cat`, for slices of different lengths (a sharded evaluation's last ranks)."""
    w = world()
    if not w.distributed:
        return t
    sizes = all_cat(torch.tensor([len(t)])).tolist()
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:len(t)] = t
    return torch.cat([p[:n] for p, n in zip(all_cat(padded).split(max(sizes)), sizes)])


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (any picklable value)."""
    if not world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world().distributed:
        dist.barrier()


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """One all-reduce of every gradient of a method step, averaged over ranks: however many
    times a method called the model (and `forward_mae`), the update is the global batch's."""
    w = world()
    if not w.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = all_sum(torch.cat([g.reshape(-1) for g in grads])) / w.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def shard(n: int) -> slice:
    """This rank's contiguous share of n items (sizes differ by at most one; none is padded)."""
    w = world()
    return slice(w.rank * n // w.size, (w.rank + 1) * n // w.size)


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (after a random draw, e.g. a new head)."""
    if not world().distributed:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            wire = _wire(t)
            dist.broadcast(wire, src=0)
            t.copy_(wire)
