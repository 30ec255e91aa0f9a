"""Every `bench run` is a Sacred run.

`<results_dir>/runs/<id>/` holds Sacred's config.json (the resolved config), run.json (status
COMPLETED / FAILED / INTERRUPTED, result, and where it came from: package versions, git commit,
host and accelerator), metrics.json (every curve), info.json (split hash, checkpoint path,
failure reason, warnings), cout.txt, and our split.json, checkpoint.pt, selected.pt, curves.csv
and TensorBoard event files. A resumed run continues in its own directory.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

with warnings.catch_warnings():  # sacred imports the deprecated pkg_resources
    warnings.simplefilter("ignore", UserWarning)
    from sacred import SETTINGS, Experiment
from sacred.host_info import HostInfoGetter
from sacred.observers import FileStorageObserver
from sacred.utils import SacredInterrupt  # noqa: F401  (re-exported: a run stopped on purpose, Sacred records its STATUS)
from tqdm import tqdm

from bench.run import provenance
from bench.run.curves import EventLog, write_curves_csv
from bench.errors import RunStopped, UsageError
from bench.io import atomic_write_text, ensure_writable_dir

SETTINGS.DISCOVER_SOURCES = "none"      # the package version is recorded; sources stay in git
SETTINGS.CAPTURE_MODE = "sys"           # "fd" would record every progress-bar refresh
# The CLI reports every outcome in one line of its own; Sacred's "Failed after ..." and
# observer tracebacks would only repeat it.
logging.getLogger("ssvit-bench").setLevel(logging.CRITICAL)


class RunStore(FileStorageObserver):
    """FileStorageObserver with atomic JSON writes and in-place resume of an existing run."""

    def __init__(self, basedir: str | Path, resume_step: int | None = None):
        # The highest priority: the file store, not MongoDB, assigns run ids.
        super().__init__(str(basedir), copy_sources=False, priority=100)
        self.resume_step = resume_step
        self.write_error: OSError | None = None
        self._cout_before = ""

    # Sacred would log a failed write and silently drop the observer for the rest of the run;
    # we keep the error so that the next flush stops the run while its checkpoint is intact.
    def _guarded(self, event: str, **kwargs) -> None:
        try:
            getattr(super(), event)(**kwargs)
        except OSError as e:
            self.write_error = e

    def log_metrics(self, **kwargs):
        self._guarded("log_metrics", **kwargs)

    def heartbeat_event(self, **kwargs):
        self._guarded("heartbeat_event", **kwargs)

    def completed_event(self, **kwargs):
        self._guarded("completed_event", **kwargs)

    def interrupted_event(self, **kwargs):
        self._guarded("interrupted_event", **kwargs)

    def failed_event(self, **kwargs):
        self._guarded("failed_event", **kwargs)

    def save_cout(self):
        # Sacred appends from a cursor, which garbles output that our filter rewrites (a
        # progress bar's frames collapse to its final state): write the whole text instead.
        atomic_write_text(os.path.join(self.dir, "cout.txt"), self._cout_before + self.cout)

    def save_json(self, obj, filename):
        from sacred.serializer import flatten
        atomic_write_text(os.path.join(self.dir, filename), json.dumps(flatten(obj), sort_keys=True, indent=2))

    def _make_run_dir(self, _id):
        if _id is not None and self.resume_step is not None:
            self.dir = os.path.join(self.basedir, str(_id))
            self._truncate_metrics(self.resume_step)
            try:  # a resumed run's output follows what the interrupted one printed
                with open(os.path.join(self.dir, "cout.txt")) as f:
                    self._cout_before = f.read().rstrip("\n") + "\n"
            except OSError:
                pass
            return
        super()._make_run_dir(_id)

    def _truncate_metrics(self, step: int) -> None:
        """Drop points logged after the checkpoint: the resumed run logs them again."""
        path = os.path.join(self.dir, "metrics.json")
        if not os.path.exists(path):
            return
        with open(path) as f:
            metrics = json.load(f)
        for series in metrics.values():
            keep = [i for i, s in enumerate(series["steps"]) if s <= step]
            for k in ("values", "steps", "timestamps"):
                series[k] = [series[k][i] for i in keep]
        self.save_json(metrics, "metrics.json")


class BenchExperiment(Experiment):
    """A Sacred experiment whose record names the code that ran: the git checkout (commit, dirty
    tree) as its repository and the CLI as its main file."""

    def get_experiment_info(self):
        info = super().get_experiment_info()
        git = provenance.git_state()
        info.update(base_dir=str(provenance.REPO), mainfile="bench/cli.py", repositories=[git] if git else [])
        return info


class RunHandle:
    """What the training code sees of the tracked run."""

    def __init__(self, sacred_run, store: RunStore):
        self._run, self._store = sacred_run, store
        self.id = str(sacred_run._id)
        self.dir = Path(store.dir)
        self.events = EventLog(self.dir, purge_from=store.resume_step)
        # Sacred's timer thread would write metrics.json concurrently with our flushes (lost
        # updates); we flush ourselves, before every checkpoint, so a kill never loses the curve
        # points a resume will not log again.
        sacred_run._stop_heartbeat()

    def flush(self) -> None:
        """Write the metrics, info and captured output logged so far to the store, TensorBoard
        and curves.csv; raises the OSError of a write that failed."""
        self._store.write_error = None
        self._run._emit_heartbeat()
        if self._store.write_error is not None:
            raise self._store.write_error
        self.events.flush()
        write_curves_csv(self.dir / "metrics.json", self.dir / "curves.csv")

    def log_scalar(self, name: str, value: float, step: int) -> None:
        self._run.log_scalar(name, value, step)
        self.events.scalar(name, value, step)

    def set_info(self, key: str, value: Any) -> None:
        self._run.info[key] = value

    def warn(self, message: str) -> None:
        """A one-line warning on stderr (above any progress bar), kept in the run's info."""
        tqdm.write(f"warning: {message}", file=sys.stderr)
        self._run.info.setdefault("warnings", []).append(message)


def final_screen(text: str) -> str:
    """What a terminal would finally show of captured output: per line, the last text written
    after a carriage return (a progress bar's final state, not the frames before it)."""
    lines = []
    for line in text.split("\n"):
        drawn = [segment for segment in line.split("\r") if segment.strip()]
        lines.append(drawn[-1].rstrip() if drawn else "")
    return "\n".join(lines)


def runs_dir(results_dir: str | Path) -> Path:
    return Path(results_dir) / "runs"


def prepare_runs_dir(results_dir: str | Path) -> Path:
    """`<results_dir>/runs`, created and checked writable; UsageError (and nothing left behind)
    when it is not."""
    path = runs_dir(results_dir)
    try:
        ensure_writable_dir(path)
    except OSError as e:
        raise UsageError(f"results directory {path} is not writable ({e.strerror}); "
                         f"pass --results-dir to a writable place") from None
    return path


def mongo_observer(url: str):
    try:
        from sacred.observers import MongoObserver
        import pymongo
    except ImportError:
        raise UsageError("--mongo needs pymongo; pip install 'ssvit-bench[mongo]'") from None
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=3000)
    try:
        client.admin.command("ping")
    except Exception as e:  # any connection failure: tell the user before the run starts
        raise UsageError(f"cannot reach MongoDB at {url} ({type(e).__name__}); start it or drop --mongo") from None
    return MongoObserver(client=client, db_name="ssvit_bench")


def tracked_run(cfg: dict[str, Any], main: Callable[[RunHandle], dict], *, resume: tuple[str, int] | None = None,
                info: dict | None = None, observers: list | None = None) -> tuple[str, dict]:
    """Run `main` as a Sacred run recorded in the file store (and `observers`);
    `resume=(run_id, checkpoint_step)` continues that run in place."""
    device = provenance.device_info(cfg["device"])
    ex = BenchExperiment("ssvit-bench", save_git_info=False, additional_host_info=[
        HostInfoGetter(lambda: device, "accelerator")])
    for package, version in provenance.versions().items():
        if version != "not installed":
            ex.add_package_dependency(package, version)
    ex.captured_out_filter = final_screen
    ex.add_config({**cfg, "mongo": provenance.redact(cfg["mongo"]) if cfg["mongo"] else None})
    store = RunStore(runs_dir(cfg["results_dir"]), resume_step=resume[1] if resume else None)
    ex.observers.extend([store, *(observers or [])])

    @ex.main
    def bench_run(_run):
        _run.info["command"] = provenance.command_line(sys.argv[1:])  # how this run was started
        return main(RunHandle(_run, store))

    options = {"--loglevel": "WARNING"}
    if resume:
        options["--id"] = resume[0]
    try:
        run = ex.run(options=options, info=dict(info or {}))
    except OSError as e:  # the store could not even record the run's start (full disk, read-only)
        raise RunStopped(f"cannot write the run record under {store.basedir} ({e.strerror or e}); "
                         f"free space or fix permissions, then run again") from None
    for observer in run._failed_observers:  # e.g. MongoDB went away mid-run; Sacred dropped it
        print(f"warning: the {type(observer).__name__} stopped recording during run {run._id}; "
              f"the run is complete in {store.dir}", file=sys.stderr)
    if store.write_error is not None:  # trained to the end, but the record is incomplete
        raise RunStopped(f"run {run._id} finished but its record in {store.dir} could not be written "
                         f"({store.write_error.strerror or store.write_error}); its final checkpoint is kept")
    return str(run._id), run.result
