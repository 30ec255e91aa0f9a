"""`bench speed --allreduce`: what the one gradient all-reduce of a step costs, measured on K
local processes (Gloo on CPU, NCCL on GPUs), for the gradient sizes of the suite's models.

Each size is all-reduced `repeats` times after a warm-up; the median time gives the
algorithmic bandwidth (bytes / time) and the bus bandwidth of a ring all-reduce
(2 (K - 1) / K x bytes / time), the input of the scaling formula in docs/PERFORMANCE.md.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.distributed.launch import free_port


def _worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, backend: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    rows = []
    for n in sizes:
        grad = torch.ones(n, dtype=torch.float32, device=device)
        for _ in range(2):
            dist.all_reduce(grad)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            dist.all_reduce(grad)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        rows.append((n, statistics.median(times)))
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def measure(sizes: list[int], world: int = 2, repeats: int = 10) -> list[dict]:
    """Median all-reduce time of float32 tensors of each size (elements) on `world` processes."""
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, free_port(), sizes, repeats, backend, out), nprocs=world,
                       start_method="spawn", join=True)
    rows = []
    for n, seconds in out.get():
        nbytes = 4 * n
        rows.append({"backend": backend, "ranks": world, "elements": n, "mbytes": nbytes / 1e6,
                     "ms": 1000 * seconds, "alg_gb_s": nbytes / seconds / 1e9,
                     "bus_gb_s": 2 * (world - 1) / world * nbytes / seconds / 1e9})
    return rows


def gradient_elements(encoder: str, **overrides) -> int:
    """Trainable parameters of a timm ViT (built on the meta device: no memory, no time)."""
    import timm
    with torch.device("meta"):
        model = timm.create_model(encoder, pretrained=False, **overrides)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
