"""Who this process is in a run: its rank, the world size, its device, and the process group.

Read from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or,
under SLURM's own launch (srun), from SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the
first host of SLURM_JOB_NODELIST as the rendezvous). A run outside both is a world of one and
never touches torch.distributed. NCCL on GPUs, Gloo on CPUs; every rank on its own GPU.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch

from bench.errors import UsageError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""          # "" for a world of one

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes runs, metrics, checkpoints and stages."""
        return self.rank == 0


_WORLD = World()


def world() -> World:
    """The world this process belongs to (a world of one until `join` is called)."""
    return _WORLD


def from_env(env: dict[str, str] | None = None) -> tuple[World, dict[str, str]] | None:
    """(the world described by torchrun's or SLURM's variables, the rendezvous address and
    port), or None outside a launcher or for a launch of one process."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" in env and "RANK" in env:  # torchrun (also torch.distributed.launch)
        size, rank, local = int(env["WORLD_SIZE"]), int(env["RANK"]), int(env.get("LOCAL_RANK", 0))
        address = {k: env.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
        source = "torchrun"
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SSVIT_NO_SLURM_WORLD" not in env:
        size, rank, local = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0))
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        address = {"MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
                   "MASTER_PORT": env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000)}
        source = "SLURM"
    else:
        return None
    if size <= 1:
        return None
    if not (0 <= rank < size):
        raise UsageError(f"{source}: rank {rank} is outside a world of {size}; check the launch")
    missing = [k for k, v in address.items() if not v]
    if missing:
        raise UsageError(f"{source} started {size} processes but {' and '.join(missing)} is not set, so the ranks "
                         f"cannot meet; launch with torchrun (it sets them) or export {missing[0]}")
    return World(rank, size, local), address


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as 'rack[1-2]-node[01-04],cpu1' -> 'rack1-node01'."""
    hosts = expand_hostlist(nodelist)
    return hosts[0] if hosts else ""


def expand_hostlist(nodelist: str) -> list[str]:
    """Every host of a SLURM node list, in SLURM's order ('a[1-2]-b[01-02]' -> a1-b01, a1-b02, a2-b01,
    a2-b02), as `scontrol show hostnames` prints them; zero padding is kept."""
    hosts: list[str] = []
    for name in _top_level_split(nodelist.strip()):
        hosts.extend(_expand_one(name))
    return hosts


def _top_level_split(nodelist: str) -> list[str]:
    """Split on the commas outside brackets: 'gpu[1,3],cpu1' -> ['gpu[1,3]', 'cpu1']."""
    parts, depth, current = [], 0, ""
    for ch in nodelist:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p for p in (p.strip() for p in parts) if p]


def _expand_one(name: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if not m:
        return [name]
    head, tail = name[:m.start()], name[m.end():]
    values = []
    for item in m.group(1).split(","):
        lo, _, hi = item.partition("-")
        if hi:
            values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            values.append(lo)
    return [head + v + rest for v in values for rest in _expand_one(tail)]


def check_devices(world_size_per_node: int, device: str, visible_gpus: int) -> None:
    """Every rank on a GPU of its own: a node cannot run more GPU ranks than it sees GPUs."""
    if device.startswith("cuda") and world_size_per_node > visible_gpus:
        raise UsageError(f"{world_size_per_node} ranks on this node need as many GPUs, but {visible_gpus} "
                         f"{'is' if visible_gpus == 1 else 'are'} visible; lower --nproc (or torchrun's "
                         f"--nproc-per-node) or check CUDA_VISIBLE_DEVICES")


def join(device_name: str, timeout_s: float) -> World:
    """Join the process group of the launch this process belongs to (a no-op outside one);
    returns the world. A rendezvous that does not answer within `timeout_s` is bad input."""
    global _WORLD
    found = from_env()
    if found is None:
        _WORLD = World()
        return _WORLD
    w, address = found
    os.environ.update({k: v for k, v in address.items() if v})
    gpu = device_name != "cpu" and torch.cuda.is_available()
    if gpu:
        check_devices(int(os.environ.get("LOCAL_WORLD_SIZE", w.size)), "cuda", torch.cuda.device_count())
        torch.cuda.set_device(w.local_rank)
    backend = "nccl" if gpu else "gloo"
    try:
        torch.distributed.init_process_group(backend, rank=w.rank, world_size=w.size,
                                             timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:
        raise UsageError(f"rank {w.rank}: cannot join the process group at {address['MASTER_ADDR']}:"
                         f"{address['MASTER_PORT']} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         f"check the rendezvous address and that every rank was started") from None
    _WORLD = World(w.rank, w.size, w.local_rank, backend)
    return _WORLD


def world_device(w: World, device_name: str) -> str:
    """The device a rank runs on: its own GPU (cuda:LOCAL_RANK) under a GPU launch."""
    if w.distributed and device_name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{w.local_rank}"
    return device_name


def leave() -> None:
    global _WORLD
    if _WORLD.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _WORLD = World()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); "
                         f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device
