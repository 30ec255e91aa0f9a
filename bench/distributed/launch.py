"""`bench run ... --nproc K`: start K ranks of one run on this machine, as torchrun does.

Each rank is `python -m bench.cli run ...` with torchrun's environment (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free local port), so the run is the
one `torchrun --nproc-per-node K -m bench.cli run ...` gives; for several machines use torchrun
itself with its rendezvous options (README, "Many GPUs"). The launcher watches the ranks: Ctrl-C
is passed on (every rank checkpoints at the same step and stops); a rank that dies ends the
others within `grace` seconds (SIGTERM, then SIGKILL), and the run is left FAILED with its last
checkpoint, to be continued with `--resume`.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: list[str], env: dict[str, str], run_id_file: Path, grace: float = 30.0) -> int:
    """Run `bench run argv` as `nproc` ranks with `env` added to theirs (it names `run_id_file`,
    where rank 0 writes the run's id); returns the exit code the run earned (0 done, 1 failed,
    2 bad input, 130 interrupted)."""
    base = dict(os.environ, **env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, "-m", "bench.cli", "run", *argv],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        first = watch(procs, interrupted, grace)
    finally:
        signal.signal(signal.SIGINT, previous)
    codes = [p.returncode for p in procs]
    run_id = run_id_file.read_text().strip() if run_id_file.exists() else None
    if first is None:
        return max(codes) if any(codes) else 0
    rank, code = first
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    where = f"; run {run_id} is FAILED, continue it with `--resume {run_id}`" if run_id and code != 2 else ""
    if code not in (1, 2, 130) or rank != 0:  # a rank's own one-line error has already said the rest
        print(f"error: rank {rank} of {nproc} {how}; the other ranks were stopped{where}", file=sys.stderr)
    return code if code in (1, 2, 130) else 1


def watch(procs: list[subprocess.Popen], interrupted: list, grace: float) -> tuple[int, int] | None:
    """Wait for every rank; pass Ctrl-C on; once a rank fails, stop the rest. Returns the first
    failed (rank, exit code), or None when all ended well."""
    forwarded, first, deadline = 0, None, None
    while [p.poll() for p in procs].count(None):  # poll every rank (any() would stop at the first)
        if len(interrupted) > forwarded:
            forwarded = len(interrupted)
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
        if first is None:
            failed = [(rank, p.returncode) for rank, p in enumerate(procs)
                      if p.returncode not in (None, 0) and not (p.returncode == 130 and interrupted)]
            if failed:  # a rank killed outright is the cause; ranks that then lost it are the effect
                first = min(failed, key=lambda f: (f[1] >= 0, f[0]))
                for other in procs:
                    if other.poll() is None:
                        other.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + grace
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    return first
