"""One cell of a study as a `bench run` process: its command line and environment (the cell's
config layer, the study's preset and overrides, a resume of an earlier attempt, its GPUs), and
the wait for it, beating the trial's heartbeat and linking the run's id to the trial as soon as
the run exists (so a retry after the worker dies can resume it)."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from bench.errors import UsageError
from bench.run.link import StudyLink
from bench.study import claims


@dataclass(frozen=True)
class CellRun:
    """How a study runs its cells: what every cell's `bench run` shares."""
    results_dir: Path
    preset: str | None
    data: str | None
    cli: dict[str, Any]          # the study's --set overrides
    gpus_per_trial: int
    cpu_share: int               # processes sharing this machine's cores (workers x ranks)
    plugins: tuple[str, ...] = ()  # --plugin files and modules, handed on to every cell

    def command(self, method: str, layer: dict[str, Any], resume: str | None) -> list[str]:
        cmd = [sys.executable, "-m", "bench.cli", "run", method, "--study-layer", json.dumps(layer),
               "--results-dir", str(self.results_dir), "--no-progress"]
        if self.gpus_per_trial > 1:  # one run on K ranks (bench run --nproc)
            cmd += ["--nproc", str(self.gpus_per_trial)]
        if self.preset:
            cmd += ["--preset", self.preset]
        if self.data:
            cmd += ["--data", self.data]
        for k, v in self.cli.items():  # JSON is YAML: every value reaches the run as it was typed
            cmd += ["--set", f"{k}={json.dumps(v)}"]
        for plugin in self.plugins:  # a file by its absolute path: the cell may start elsewhere
            path = Path(plugin).expanduser()
            cmd += ["--plugin", str(path.resolve()) if path.is_file() else plugin]
        if resume:
            cmd += ["--resume", resume]
        return cmd

    def env(self, link: StudyLink, gpu: str | None) -> dict[str, str]:
        env = {**os.environ, **link.to_env(), "PYTHONUNBUFFERED": "1"}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        elif self.cpu_share > 1:  # CPU ranks share the cores instead of oversubscribing
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.cpu_share)))
        return env

    def start(self, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_die_with_parent, start_new_session=True)


def wait(proc: subprocess.Popen, study: optuna.Study, trial: optuna.Trial, id_file: Path, heartbeat: float) -> str:
    """Wait for the run, refreshing the trial's heartbeat and linking its run id as soon as
    the run exists (so a retry after this worker dies can resume it); return its stderr."""
    import threading
    chunks: list[str] = []
    linked = False
    reader = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            claims.beat(study, trial)
            if not linked and id_file.exists():
                trial.set_user_attr("run_id", id_file.read_text().strip())
                linked = True
        except Exception:  # a storage hiccup must not kill the run; the next beat retries
            pass
        try:
            proc.wait(timeout=heartbeat)
        except subprocess.TimeoutExpired:
            pass
    reader.join(timeout=10)
    return "".join(chunks)


def gpu_slots(gpus: list[str], workers: int, per_trial: int) -> list[str | None]:
    """Each worker's CUDA_VISIBLE_DEVICES: `per_trial` GPUs of its own, or None without GPUs.
    A worker with one GPU of several keeps the round-robin of one GPU per worker."""
    if not gpus:
        return [None] * workers
    if per_trial == 1:
        return [gpus[i % len(gpus)] for i in range(workers)]
    if workers * per_trial > len(gpus):
        raise UsageError(f"--workers {workers} x --gpus-per-trial {per_trial} needs {workers * per_trial} GPUs, "
                         f"{len(gpus)} are visible; lower one of them")
    return [",".join(gpus[i * per_trial:(i + 1) * per_trial]) for i in range(workers)]


def visible_gpus() -> list[str]:
    try:
        import torch
        n = torch.cuda.device_count()
    except Exception:
        return []
    if n <= 1:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[:n] if visible else [str(i) for i in range(n)]


def _die_with_parent() -> None:
    """Linux: the run is killed when its worker dies, so a dead worker leaves no orphan."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def send(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def last_line(text: str) -> str:
    lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
    return lines[-1][:500] if lines else ""
