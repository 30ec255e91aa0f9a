"""`bench study ... --launcher slurm`: the study's workers as SLURM jobs, through submitit.

Each job runs one `bench study` worker (the same command, `--launcher local`) against the
study's shared storage (a PostgreSQL URL for several nodes; the journal file on one). A job that
is preempted or reaches its time limit is requeued: SLURM's SIGTERM stops the worker as Ctrl-C
would (every running cell checkpoints), submitit's signal then requeues the job, and the new
incarnation resumes the interrupted cell from its checkpoint. The submitting command waits for
its jobs and writes the report.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.errors import UsageError


def _executor(folder: Path, options: dict[str, Any]):
    try:
        import submitit
    except ImportError:
        raise UsageError("--launcher slurm needs submitit; pip install 'ssvit-bench[slurm]'") from None
    import shutil
    if shutil.which("sbatch") is None:
        raise UsageError("--launcher slurm: no `sbatch` on this machine; run from a SLURM login node or use "
                         "--launcher local")
    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=10)
    executor.update_parameters(**options)
    return executor


class StudyWorker:
    """A study worker as a submitit job: `bench study ...` in a subprocess. On preemption or
    time-out, submitit calls `checkpoint`, which asks the worker to stop (a preemption's SIGTERM
    may already have: the worker takes both as one request), waits for it to checkpoint its cells
    and write its report, and asks for the same call again.

    `checkpoint` runs inside submitit's signal handler, on the thread that is waiting for the
    worker: the waiting is a lock-free poll of waitpid, as Popen.wait would hold a lock that the
    handler's own wait could then never take."""
    requeue_grace = 5.0  # seconds an interrupted worker's job waits for submitit's signal, which follows SLURM's SIGTERM

    def __init__(self, argv: list[str], stop_within: float = 60.0):
        self.argv = list(argv)
        self.stop_within = stop_within  # seconds a stopping worker gets before it is killed
        self.proc: subprocess.Popen | None = None

    def __call__(self) -> int:
        # submitit's own signal reaches every process of the job; only submitit acts on it
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "study", *self.argv],
                                     preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
        while not self._ended():
            time.sleep(0.5)
        code = self.proc.returncode
        if code == 130:  # stopped by a preemption's SIGTERM: the requeue signal may be on its way
            time.sleep(self.requeue_grace)
        if code not in (0, 130):
            raise RuntimeError(f"the study worker exited with code {code}")
        return code

    def _ended(self) -> bool:
        if self.proc.returncode is None:
            try:
                pid, status = os.waitpid(self.proc.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by the other side of a signal: it has ended
                return True
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
        return self.proc.returncode is not None

    def checkpoint(self):  # submitit calls it with the job's own arguments: none
        import submitit
        if self.proc is not None and not self._ended():
            self.proc.send_signal(signal.SIGINT)  # the cells checkpoint at their next step
            deadline = time.monotonic() + self.stop_within
            while not self._ended() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self._ended():
                self.proc.kill()
        return submitit.helpers.DelayedSubmission(StudyWorker(self.argv, self.stop_within))

    def __getstate__(self) -> dict:
        return {"argv": self.argv, "stop_within": self.stop_within, "proc": None}


def submit_workers(argv: list[str], workers: int, folder: Path, options: dict[str, Any]) -> list:
    """Submit `workers` jobs each running `bench study argv`; returns the submitit jobs."""
    executor = _executor(folder, options)
    # on a time-out the worker must have stopped before SLURM's own kill at the limit, or the
    # job is not requeued: submitit's signal comes signal_delay_s before it
    stop_within = max(10.0, float(options.get("signal_delay_s", 90)) - 30.0)
    return [executor.submit(StudyWorker(argv, stop_within)) for _ in range(workers)]


def wait(jobs: list) -> list[str]:
    """Wait for every job; the states of those that did not end well."""
    bad = []
    for job in jobs:
        try:
            job.result()
        except Exception as e:  # a failed job: its cells are retried by the others or a rerun
            bad.append(f"job {job.job_id}: {str(e).splitlines()[-1][:200] if str(e) else type(e).__name__}")
    return bad


def parse_options(items: list[str]) -> dict[str, Any]:
    """`--slurm KEY=VALUE` (repeatable) as submitit SlurmExecutor parameters, e.g. partition=gpu,
    time=240 (minutes), gpus_per_node=8, cpus_per_task=10, signal_delay_s=120."""
    import yaml
    out: dict[str, Any] = {"signal_delay_s": 90}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--slurm {item!r}: expected KEY=VALUE, e.g. --slurm partition=gpu")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out
