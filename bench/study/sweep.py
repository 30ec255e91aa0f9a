"""`bench study`: a grid of cells run as Optuna trials, each trial one Sacred run.

One Optuna study per (study, dataset, preset) in a shared storage (bench.study.storage). Every
cell is run once: workers claim cells (bench.study.claims), a claimed cell runs as a `bench run`
process (bench.study.cell_run) while its trial's heartbeat is kept, and a dead worker's cell is
retried, resuming the run's checkpoint where there is one. A failed cell (e.g. a non-finite loss)
is recorded as FAIL and the study goes on; a later `bench study` retries it. COMPLETE cells are
never run again. This module holds the workers' threads, Ctrl-C and SIGTERM, and the display.
"""
from __future__ import annotations

import contextlib
import json
import random
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.trial import TrialState

from bench.errors import UsageError
from bench.run.link import StudyLink
from bench.run.prepare import check_resumable, find_run_dir
from bench.run.provenance import redact
from bench.study import claims
from bench.study.cell_run import CellRun, gpu_slots, last_line, send, visible_gpus, wait
from bench.study.display import SweepDisplay
from bench.study.records import add_finished, finished_trials, same_runs
from bench.study.spec import Cell, StudySpec
from bench.study.storage import open_storage, study_name


# -- the sweep -------------------------------------------------------------------------------
@dataclass
class Sweep:
    spec: StudySpec
    dataset: str
    preset: str | None
    cells: list[Cell]
    storage_url: str
    results_dir: Path
    cli: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    workers: int = 1
    gpus_per_trial: int = 1   # ranks per cell: its GPUs (or CPU processes on a machine without)
    heartbeat: float = 30.0
    progress: bool = True
    log: Any = print
    plugins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.grace = claims.HEARTBEATS_OF_GRACE * self.heartbeat
        self.seeds = len({c.seed for c in self.cells})
        self.name = study_name(self.spec, self.dataset, self.preset)
        self.study = optuna.create_study(study_name=self.name, storage=open_storage(self.storage_url),
                                         load_if_exists=True, direction="maximize")
        self.study.set_user_attr("spec", str(self.spec.path))
        self.study.set_user_attr("results_dir", str(self.results_dir.resolve()))
        self.runner = CellRun(self.results_dir, self.preset, self.data, self.cli, self.gpus_per_trial,
                              self.workers * self.gpus_per_trial, tuple(self.plugins))
        self._attempted: set[str] = set()
        self.same_run = same_runs(self.cells, self._config)  # cell -> the earlier cell it is one run with
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._procs: set = set()
        self._running: dict[int, tuple[Cell, Path]] = {}  # worker slot -> its cell, progress file
        self._requests = 0
        self._signals_seen: set[int] = set()
        self.failed: list[str] = []

    def done(self) -> int:
        board = claims.read_board(self.study, self.grace)
        return sum(board.done(c.key) for c in self.cells)

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM (a SLURM preemption, `kill`) stop the sweep for as long as the block
        runs, the report written after it included: the handler only counts requests, as a
        KeyboardInterrupt raised inside a storage call could leave the journal's lock behind."""
        previous = signal.signal(signal.SIGINT, self._on_signal)
        previous_term = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term)

    def run(self) -> dict[str, int] | None:
        """Run the cells; the counts, or None when a stop was requested (every running cell then
        checkpointed and exited)."""
        done = self.done()
        self.log(f"study {self.name}: {len(self.cells)} cells, {done} already done; "
                 f"storage {redact(self.storage_url)}")
        slots = gpu_slots(visible_gpus(), self.workers, self.gpus_per_trial)
        threads = [threading.Thread(target=self._worker, args=(i, slots[i]), daemon=True)
                   for i in range(self.workers)]
        display = SweepDisplay(self.spec.name, len(self.cells), done, self.workers, self.progress)
        try:
            for t in threads:
                t.start()
            polled = 0.0
            while any(t.is_alive() for t in threads) and not self._requests:
                time.sleep(0.2)
                if time.monotonic() - polled >= 2.0:
                    polled = time.monotonic()
                    with self._lock:
                        running = dict(self._running)
                    display.update(self.done(), running)
            if self._requests:
                self._stop_runs(threads)
                return None
        finally:
            display.close()
        return {"cells": len(self.cells), "done": self.done(), "failed": len(self.failed)}

    @property
    def stop_requested(self) -> bool:
        return self._requests > 0

    def _on_signal(self, signum, frame) -> None:
        # SLURM's SIGTERM and the SIGINT a requeue passes on after it are one request; a signal
        # seen before asks for more (a second Ctrl-C stops the cells at once)
        if signum in self._signals_seen or not self._signals_seen:
            self._requests += 1
        self._signals_seen.add(signum)

    def _stop_runs(self, threads: list[threading.Thread]) -> None:
        """No new trial starts; every running one gets SIGINT (it checkpoints at the next step
        and exits), and again on each further Ctrl-C (it then stops at once)."""
        forwarded = 0
        while any(t.is_alive() for t in threads):
            if forwarded < self._requests:
                forwarded = self._requests
                with self._lock:
                    self._stop.set()
                    for proc in self._procs:
                        send(proc, signal.SIGINT)
            time.sleep(0.1)

    # -- one worker --------------------------------------------------------------------------
    def _worker(self, slot: int, gpu: str | None) -> None:
        while not self._stop.is_set():
            claimed = self._claim()
            if claimed is None:
                return
            if claimed == "wait":
                time.sleep(min(self.heartbeat, 2.0) * (0.5 + random.random()))
                continue
            cell, trial = claimed
            self._run_trial(cell, trial, gpu, slot)

    def _claim(self):
        """(cell, trial) claimed for this worker, "wait" while others hold the remaining cells,
        or None when nothing is left for this invocation."""
        claims.fail_stale(self.study, self.grace, f"worker lost: no heartbeat for {self.grace:.0f}s")
        with self._lock:  # read before the board: a cell attempted by then shows there as busy or ended
            attempted = set(self._attempted)
        board = claims.read_board(self.study, self.grace)
        open_cells = [c for c in self.cells if not board.done(c.key) and c.key not in attempted]
        for cell in [c for c in open_cells if c.key in self.same_run]:
            first = self.same_run[cell.key]
            if board.done(first):
                self._take_run(cell, first)
                open_cells.remove(cell)
            elif first in attempted and not board.busy(first):  # its run failed here, and so would this
                with self._lock:
                    self._attempted.add(cell.key)
                    self.failed.append(cell.key)
                self.log(f"cell {cell.key} skipped: it is the same run as {first}, which failed")
                open_cells.remove(cell)
        # a cell that is one run with an earlier cell waits for that cell's run
        free = [c for c in open_cells if not board.busy(c.key) and c.key not in self.same_run]
        if not free:
            return "wait" if open_cells else None
        # one seed at a time (its cached stages serve its cells while they are warm, and a study
        # stopped part-way holds whole seeds); random within it, so concurrent workers rarely collide
        first = min(c.seed for c in open_cells)
        cell = random.choice([c for c in free if c.seed == first] or free)
        trial = claims.claim(self.study, cell.key, self.grace)
        if trial is None:
            return "wait"
        claims.set_params(self.study, trial, self.spec.params(cell, self.seeds))
        with self._lock:
            self._attempted.add(cell.key)
        return cell, trial

    def _take_run(self, cell: Cell, first: str) -> None:
        """Finish `cell` with the run of `first`, the cell it is one run with."""
        with self._lock:  # two workers of this sweep seeing it at once add it once
            done = finished_trials(self.study)
            if cell.key in done:
                return
            trial = done[first]
            add_finished(self.study, self.spec, cell, float(trial.value),
                         {**trial.user_attrs, "same_run_as": first}, self.seeds)
        self.log(f"cell {cell.key} is the same run as {first}: it takes that run")

    def _config(self, cell: Cell) -> dict[str, Any]:
        data = {"data": self.data} if self.data else {}
        return self.spec.config(cell, self.dataset, self.preset, {**self.cli, **data, "results_dir": str(self.results_dir)})

    def _run_trial(self, cell: Cell, trial: optuna.Trial, gpu: str | None, slot: int = 0) -> None:
        for k, v in {"method": cell.method, "seed": cell.seed, "variant": cell.variant, "dataset": self.dataset,
                     "preset": self.preset or "", **{f"axis.{a}": v for a, v in cell.axes}}.items():
            trial.set_user_attr(k, v)
        cmd = self.runner.command(cell.method, {**self.spec.study_layer(cell), "dataset": self.dataset},
                                  self._resumable_run(cell))
        with tempfile.TemporaryDirectory() as tmp:
            link = StudyLink({"study": self.name, "trial": trial.number, "storage": redact(self.storage_url),
                              "cell": cell.key}, Path(tmp) / "run_id", Path(tmp) / "progress.json")
            with self._lock:  # started under the lock: after a Ctrl-C no new run starts
                proc = None if self._stop.is_set() else self.runner.start(cmd, self.runner.env(link, gpu))
                if proc is not None:
                    self._procs.add(proc)
                    self._running[slot] = (cell, link.progress_file)
            if proc is None:
                claims.finish(self.study, trial, TrialState.FAIL, reason="interrupted (Ctrl-C) before it started")
                return
            stderr = wait(proc, self.study, trial, link.run_id_file, self.heartbeat)
            with self._lock:
                self._procs.discard(proc)
                self._running.pop(slot, None)
            run_id = link.run_id_file.read_text().strip() if link.run_id_file.exists() else None
        if run_id:
            trial.set_user_attr("run_id", run_id)
        record = self._record(run_id)
        if proc.returncode == 0 and record.get("status") == "COMPLETED":
            result = record["result"]
            for k in ("test_acc", "test_acc_ema", "test_acc_selected", "selected_val_acc", "minutes"):
                if k in result:
                    trial.set_user_attr(k, result[k])
            claims.finish(self.study, trial, TrialState.COMPLETE, value=result.get("selected_val_acc", 0.0))
            return
        interrupted = proc.returncode in (130, -signal.SIGINT)  # -SIGINT: stopped while starting up
        reason = last_line(stderr) or f"exit code {proc.returncode}"
        if interrupted:
            reason = "interrupted (Ctrl-C); rerun the study to resume it"
        claims.finish(self.study, trial, TrialState.FAIL, reason=reason)
        self.failed.append(cell.key)
        if not interrupted:
            self.log(f"cell {cell.key} FAILED: {reason}")

    def _resumable_run(self, cell: Cell) -> str | None:
        """The run of an earlier, unfinished attempt at this cell that can be resumed."""
        board = claims.read_board(self.study, self.grace)
        for t in sorted(board.trials.get(cell.key, []), key=lambda t: -t.number):
            run_id = t.user_attrs.get("run_id")
            if t.state == TrialState.FAIL and run_id:
                try:
                    run_dir = find_run_dir(self.results_dir, run_id)
                    check_resumable(self._config(cell), run_dir)
                    return run_id
                except (UsageError, OSError, ValueError):
                    continue
        return None

    def _record(self, run_id: str | None) -> dict:
        if not run_id:
            return {}
        try:
            return json.loads((self.results_dir / "runs" / run_id / "run.json").read_text())
        except (OSError, ValueError):
            return {}
