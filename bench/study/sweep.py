"""`bench study`: a grid of cells run as Optuna trials, each trial one Sacred run.

One Optuna study per (study, dataset, preset) in a shared storage: an Optuna journal file
under the results directory by default, or any RDB URL (PostgreSQL) so that workers on many
machines share it. Every cell is run once:

- Claiming: a worker creates a trial, writes its heartbeat, then the cell key; it reads the
  trials back and abandons its claim if any other live claim on that cell exists. Of two
  concurrent claims the later read always sees the other, so at most one proceeds.
- Heartbeats: a running trial refreshes a timestamp; a claim whose heartbeat is older than the
  grace period belonged to a dead worker: it is failed and the cell is retried (resuming the
  run's checkpoint where there is one).
- A failed cell (e.g. a non-finite loss) is recorded as FAIL and the study goes on; a later
  `bench study` retries it. COMPLETE cells are never run again.

Each trial is a `bench run` subprocess (one GPU each with several visible) that dies with its
worker. Trial and run are cross-linked: the trial holds the run id, the run's info the trial.
"""
from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from bench.errors import UsageError
from bench.run.provenance import redact
from bench.run.runner import check_resumable, find_run_dir
from bench.study.spec import Cell, StudySpec

optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- storage ---------------------------------------------------------------------------------
def default_storage(results_dir: str | Path) -> str:
    return str(Path(results_dir) / "studies" / "optuna.journal")


def open_storage(url: str):
    """An Optuna storage from an RDB URL or a journal file path; UsageError when unreachable."""
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
        path = Path(url)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        except OSError as e:
            raise UsageError(f"cannot open the study journal {path} ({e.strerror}); pass --results-dir "
                             f"or --storage to a writable place") from None
        return optuna.storages.JournalStorage(backend)
    try:
        created = create_schema_once(url)
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, skip_table_creation=created)
    except ImportError as e:
        raise UsageError(f"--storage {redact(url)}: its database driver is not installed "
                         f"({e.__cause__ or e}); for PostgreSQL pip install 'ssvit-bench[postgres]'") from None
    except Exception as e:
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        if is_connection_error(e):
            raise UsageError(f"cannot reach --storage {redact(url)} ({type(e).__name__}: {first}); check the "
                             f"URL and that the server runs") from None
        raise UsageError(f"--storage {redact(url)} was reached but opening its Optuna tables failed "
                         f"({type(e).__name__}: {first}); check that the database is an Optuna storage of "
                         f"this Optuna version (`optuna storage upgrade --storage URL` migrates an old one)") from None


# Any 64-bit key works; this one is the suite's, so its workers queue behind each other only.
SCHEMA_LOCK = 0x55566974


def create_schema_once(url: str) -> bool:
    """Create Optuna's tables while holding a database-wide lock (PostgreSQL advisory lock,
    MySQL GET_LOCK), so workers that open a fresh database at the same instant queue for the
    schema instead of racing to create it (which fails with a UniqueViolation on pg_type).
    Returns whether the schema now exists (False: a database this does not lock, e.g. SQLite)."""
    import sqlalchemy
    engine = sqlalchemy.create_engine(url)
    try:
        name = engine.dialect.name
        if name not in ("postgresql", "mysql", "mariadb"):
            return False  # SQLite: one machine, the file lock serialises creation
        with engine.connect() as conn:
            if name == "postgresql":
                conn.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({SCHEMA_LOCK})"))
            else:
                conn.execute(sqlalchemy.text("SELECT GET_LOCK('ssvit_bench_schema', 600)"))
            try:
                optuna.storages.RDBStorage(url).remove_session()  # creates what is missing
            finally:
                if name == "postgresql":
                    conn.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock({SCHEMA_LOCK})"))
                else:
                    conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK('ssvit_bench_schema')"))
        return True
    finally:
        engine.dispose()


def is_connection_error(e: Exception) -> bool:
    import sqlalchemy
    return isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, ConnectionError, OSError))


def study_name(spec: StudySpec, dataset: str, preset: str | None) -> str:
    return f"{spec.name}:{dataset}:{preset or 'default'}"


# -- cell states -----------------------------------------------------------------------------
@dataclass
class Board:
    """Every cell's trials, read from the storage at one instant."""
    trials: dict[str, list[FrozenTrial]]
    now: float
    grace: float

    def live(self, t: FrozenTrial) -> bool:
        return t.state == TrialState.RUNNING and self.now - t.system_attrs.get("heartbeat", 0) <= self.grace

    def done(self, key: str) -> bool:
        return any(t.state == TrialState.COMPLETE for t in self.trials.get(key, []))

    def busy(self, key: str, mine: int | None = None) -> bool:
        return any(self.live(t) and t.number != mine for t in self.trials.get(key, []))

    def stale(self) -> list[FrozenTrial]:
        return [t for ts in self.trials.values() for t in ts if t.state == TrialState.RUNNING and not self.live(t)]


def read_board(study: optuna.Study, grace: float) -> Board:
    trials: dict[str, list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("cell")
        if key is not None:
            trials.setdefault(key, []).append(t)
    return Board(trials, time.time(), grace)


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

    def __post_init__(self) -> None:
        self.grace = 4 * self.heartbeat
        self.seeds = len({c.seed for c in self.cells})
        self.name = study_name(self.spec, self.dataset, self.preset)
        self.study = optuna.create_study(study_name=self.name, storage=open_storage(self.storage_url),
                                         load_if_exists=True, direction="maximize")
        self.study.set_user_attr("spec", str(self.spec.path))
        self.study.set_user_attr("results_dir", str(self.results_dir.resolve()))
        self._attempted: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._procs: set[subprocess.Popen] = set()
        self._running: dict[int, tuple[Cell, Path]] = {}  # worker slot -> its cell, progress file
        self._sigints = 0
        self.failed: list[str] = []

    def run(self) -> dict[str, int]:
        board = read_board(self.study, self.grace)
        done = sum(board.done(c.key) for c in self.cells)
        self.log(f"study {self.name}: {len(self.cells)} cells, {done} already done; "
                 f"storage {redact(self.storage_url)}")
        slots = gpu_slots(_visible_gpus(), self.workers, self.gpus_per_trial)
        threads = [threading.Thread(target=self._worker, args=(i, slots[i]), daemon=True)
                   for i in range(self.workers)]
        bar = tqdm(total=len(self.cells), initial=done, desc=self.spec.name, unit="cell", disable=not self.progress)
        cell_bars = [tqdm(total=1, position=i + 1, leave=False, disable=not self.progress,
                          bar_format="  {desc} {percentage:3.0f}%|{bar:20}| {n}/{total} {postfix}")
                     for i in range(self.workers)]
        # Ctrl-C only counts presses: a KeyboardInterrupt raised inside a storage call could leave
        # the journal's lock behind, and a signal handler must not take locks. SIGTERM (a SLURM
        # preemption, `kill`) stops the study the same way.
        previous = signal.signal(signal.SIGINT, self._count_sigint)
        previous_term = signal.signal(signal.SIGTERM, self._count_sigint)
        try:
            for t in threads:
                t.start()
            polled = 0.0
            while any(t.is_alive() for t in threads) and not self._sigints:
                time.sleep(0.2)
                if time.monotonic() - polled >= 2.0:
                    polled = time.monotonic()
                    now_done = sum(read_board(self.study, self.grace).done(c.key) for c in self.cells)
                    bar.update(now_done - bar.n)
                    self._show_running(cell_bars)
            if self._sigints:
                self._stop_runs(threads)
                raise KeyboardInterrupt
        finally:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term)
            for b in cell_bars:
                b.close()
            bar.close()
        board = read_board(self.study, self.grace)
        return {"cells": len(self.cells), "done": sum(board.done(c.key) for c in self.cells),
                "failed": len(self.failed)}

    def _count_sigint(self, signum, frame) -> None:
        self._sigints += 1

    def _stop_runs(self, threads: list[threading.Thread]) -> None:
        """No new trial starts; every running one gets SIGINT (it checkpoints at the next step
        and exits), and again on each further Ctrl-C (it then stops at once)."""
        forwarded = 0
        while any(t.is_alive() for t in threads):
            if forwarded < self._sigints:
                forwarded = self._sigints
                with self._lock:
                    self._stop.set()
                    for proc in self._procs:
                        _signal(proc, signal.SIGINT)
            time.sleep(0.1)

    # -- one worker --------------------------------------------------------------------------
    def _show_running(self, bars: list) -> None:
        """Each worker's running cell: its stage, step, validation accuracy and ETA, as the run
        reports them in its progress file."""
        for slot, b in enumerate(bars):
            with self._lock:
                running = self._running.get(slot)
            if running is None:
                b.set_description_str("idle", refresh=False)
                b.reset(total=1)
                continue
            cell, path = running
            try:
                p = json.loads(path.read_text())
            except (OSError, ValueError):
                p = {"stage": "starting", "step": 0, "steps": 1}
            b.total, b.n = max(int(p["steps"]), 1), int(p["step"])
            b.set_description_str(f"{cell.key}{' [' + p['stage'] + ']' if p.get('stage') else ''}", refresh=False)
            postfix = {}
            if p.get("val_acc") is not None:
                postfix["val"] = f"{p['val_acc']:.1f}"
            if p.get("eta_s") is not None:
                postfix["eta"] = tqdm.format_interval(p["eta_s"])
            b.set_postfix(postfix, refresh=False)
            b.refresh()

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
        board = read_board(self.study, self.grace)
        for t in board.stale():  # a dead worker's trial: fail it so its cell is retried
            self._finish(t, TrialState.FAIL, reason=f"worker lost: no heartbeat for {self.grace:.0f}s")
        with self._lock:
            open_cells = [c for c in self.cells if not board.done(c.key) and c.key not in self._attempted]
        free = [c for c in open_cells if not board.busy(c.key)]
        if not free:
            return "wait" if open_cells else None
        cell = random.choice(free)  # random: concurrent workers rarely collide
        trial = self.study.ask()
        storage = self.study._storage
        storage.set_trial_system_attr(trial._trial_id, "heartbeat", time.time())
        trial.set_user_attr("cell", cell.key)
        after = read_board(self.study, self.grace)
        if after.busy(cell.key, mine=trial.number) or after.done(cell.key):
            # A withdrawn claim carries no parameters and no value: nothing a dashboard plots.
            storage.set_trial_user_attr(trial._trial_id, "withdrawn", True)
            self._finish(trial, TrialState.FAIL, reason="claim withdrawn: another worker has this cell")
            return "wait"
        try:
            for name, (value, distribution) in self.spec.params(cell, self.seeds).items():
                storage.set_trial_param(trial._trial_id, name, distribution.to_internal_repr(value), distribution)
        except ValueError:  # the study file's grid changed since earlier trials: params stay in user attrs
            pass
        with self._lock:
            self._attempted.add(cell.key)
        return cell, trial

    def _run_trial(self, cell: Cell, trial: optuna.Trial, gpu: str | None, slot: int = 0) -> None:
        cfg_layer = {**self.spec.study_layer(cell), "dataset": self.dataset}
        for k, v in {"method": cell.method, "seed": cell.seed, "variant": cell.variant, "dataset": self.dataset,
                     "preset": self.preset or "", **{f"axis.{a}": v for a, v in cell.axes}}.items():
            trial.set_user_attr(k, v)
        resume = self._resumable_run(cell)
        with tempfile.TemporaryDirectory() as tmp:
            id_file, progress_file = Path(tmp) / "run_id", Path(tmp) / "progress.json"
            cmd = [sys.executable, "-m", "bench.cli", "run", cell.method, "--study-layer", json.dumps(cfg_layer),
                   "--results-dir", str(self.results_dir), "--no-progress"]
            if self.gpus_per_trial > 1:  # one run on K ranks (bench run --nproc)
                cmd += ["--nproc", str(self.gpus_per_trial)]
            if self.preset:
                cmd += ["--preset", self.preset]
            if self.data:
                cmd += ["--data", self.data]
            for k, v in self.cli.items():  # JSON is YAML: every value reaches the run as it was typed
                cmd += ["--set", f"{k}={json.dumps(v)}"]
            if resume:
                cmd += ["--resume", resume]
            env = dict(os.environ, SSVIT_RUN_ID_FILE=str(id_file), SSVIT_PROGRESS_FILE=str(progress_file),
                       PYTHONUNBUFFERED="1",
                       SSVIT_TRIAL=json.dumps({"study": self.name, "trial": trial.number,
                                               "storage": redact(self.storage_url), "cell": cell.key}))
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            elif self.workers * self.gpus_per_trial > 1:  # CPU ranks share the cores instead of oversubscribing
                env.setdefault("OMP_NUM_THREADS",
                               str(max(1, (os.cpu_count() or 1) // (self.workers * self.gpus_per_trial))))
            with self._lock:  # started under the lock: after a Ctrl-C no new run starts
                proc = None if self._stop.is_set() else subprocess.Popen(
                    cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                    preexec_fn=_die_with_parent, start_new_session=True)
                if proc is not None:
                    self._procs.add(proc)
                    self._running[slot] = (cell, progress_file)
            if proc is None:
                self._finish(trial, TrialState.FAIL, reason="interrupted (Ctrl-C) before it started")
                return
            stderr = self._wait(proc, trial, id_file)
            with self._lock:
                self._procs.discard(proc)
                self._running.pop(slot, None)
            run_id = id_file.read_text().strip() if id_file.exists() else None
        if run_id:
            trial.set_user_attr("run_id", run_id)
        record = self._record(run_id)
        if proc.returncode == 0 and record.get("status") == "COMPLETED":
            result = record["result"]
            for k in ("test_acc", "test_acc_ema", "test_acc_selected", "selected_val_acc", "minutes"):
                if k in result:
                    trial.set_user_attr(k, result[k])
            self._finish(trial, TrialState.COMPLETE, value=result.get("selected_val_acc", 0.0))
            return
        interrupted = proc.returncode in (130, -signal.SIGINT)  # -SIGINT: stopped while starting up
        reason = _last_line(stderr) or f"exit code {proc.returncode}"
        if interrupted:
            reason = "interrupted (Ctrl-C); rerun the study to resume it"
        self._finish(trial, TrialState.FAIL, reason=reason)
        self.failed.append(cell.key)
        if not interrupted:
            self.log(f"cell {cell.key} FAILED: {reason}")

    def _wait(self, proc: subprocess.Popen, trial: optuna.Trial, id_file: Path) -> str:
        """Wait for the run, refreshing the trial's heartbeat and linking its run id as soon as
        the run exists (so a retry after this worker dies can resume it); return its stderr."""
        chunks: list[str] = []
        linked = False
        reader = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)
        reader.start()
        while proc.poll() is None:
            try:
                self.study._storage.set_trial_system_attr(trial._trial_id, "heartbeat", time.time())
                if not linked and id_file.exists():
                    trial.set_user_attr("run_id", id_file.read_text().strip())
                    linked = True
            except Exception:  # a storage hiccup must not kill the run; the next beat retries
                pass
            try:
                proc.wait(timeout=self.heartbeat)
            except subprocess.TimeoutExpired:
                pass
        reader.join(timeout=10)
        return "".join(chunks)

    def _resumable_run(self, cell: Cell) -> str | None:
        """The run of an earlier, unfinished attempt at this cell that can be resumed."""
        board = read_board(self.study, self.grace)
        for t in sorted(board.trials.get(cell.key, []), key=lambda t: -t.number):
            run_id = t.user_attrs.get("run_id")
            if t.state == TrialState.FAIL and run_id:
                try:
                    run_dir = find_run_dir(self.results_dir, run_id)
                    cfg = self.spec.config(cell, self.dataset, self.preset, {**self.cli, "results_dir": str(self.results_dir)})
                    check_resumable(cfg, run_dir)
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

    def _finish(self, trial, state: TrialState, value: float | None = None, reason: str = "") -> None:
        """End a trial (a live `optuna.Trial` or a `FrozenTrial` of another worker)."""
        try:
            if reason:
                self.study._storage.set_trial_user_attr(trial._trial_id, "reason", reason)
            self.study.tell(trial.number, value if state == TrialState.COMPLETE else None, state=state)
        except (ValueError, RuntimeError):
            pass  # another worker finished it first (e.g. two workers failing one stale trial)


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


def _visible_gpus() -> list[str]:
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


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _last_line(text: str) -> str:
    lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
    return lines[-1][:500] if lines else ""
