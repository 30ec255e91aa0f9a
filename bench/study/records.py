"""A report folder carries its runs: one record per finished cell, so that the report rebuilds,
and its study resumes, on a fresh clone or another machine.

A published study outlives the machine that ran it: each session's finished cells are written
beside the tables (`runs/<cell>.json`), and the next `bench study` or `bench report` with the same
--report-dir puts them back into its stores as finished trials, so only the missing cells run.
A record is put back only while it is still its cell's run: the config the cell resolves to now
must equal the record's on every key that changes a result (the rule --resume applies). A stale
record is named, left in place, and its cell runs again. A cell with no record of its own takes
the record of the same run (an equal config) from another cell of its folder or from another
study's folder beside it: a run already recorded under another cell's name is not trained again.
Two cells of one invocation that are the same run train once: the second waits for the first and
takes its run (`same_runs`).

A record holds what a report reads (the Sacred run record, curves, config and info, the size of
the validation split), not weights or the split's index lists (those are rebuilt from the seed).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from bench.config import differing_keys, identity
from bench.errors import UsageError
from bench.io import atomic_write_text, read_json
from bench.study.spec import Cell, StudySpec

FILES = ("run.json", "metrics.json", "config.json", "info.json")
RESTORED = "restored.json"  # in a run directory put back from a record: where it came from


def record_path(folder: Path, key: str) -> Path:
    return Path(folder) / "runs" / (key.replace("|", "+").replace("/", "_") + ".json")


def finished_trials(study) -> dict[str, Any]:
    """Each cell's first COMPLETE trial: the one a report counts."""
    first: dict[str, Any] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        key = t.user_attrs.get("cell")
        if t.state == TrialState.COMPLETE and key is not None and key not in first:
            first[key] = t
    return first


def val_images(run_dir: Path) -> int | None:
    """The size of a run's validation split (from its split, or from the record it came from)."""
    for name, read in (("split.json", lambda d: len(d.get("val") or [])), (RESTORED, lambda d: d.get("val_images"))):
        try:
            n = read(json.loads((run_dir / name).read_text()))
        except (OSError, ValueError):
            continue
        if n:
            return int(n)
    return None


def save(study, cells: list[Cell], results_dir: Path, folder: Path) -> int:
    """Write the record of every reported cell's finished run; return how many were written.
    Records of cells not finished here are kept (another machine may hold their runs)."""
    trials = finished_trials(study)
    written = 0
    for cell in cells:
        trial = trials.get(cell.key)
        run_id = trial.user_attrs.get("run_id") if trial is not None else None
        run_dir = Path(results_dir) / "runs" / str(run_id)
        if not run_id or not (run_dir / "run.json").is_file():
            continue
        origin = read_json(run_dir / RESTORED)
        record = {"cell": cell.key, "run_id": origin.get("run_id", str(run_id)), "value": trial.value,
                  "val_images": val_images(run_dir),
                  "trial": {k: v for k, v in trial.user_attrs.items() if k not in ("run_id", "restored_from")},
                  "files": {name: read_json(run_dir / name) for name in FILES}}
        text = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
        path = record_path(folder, cell.key)
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
        written += 1
    return written


def restore(study, spec: StudySpec, cells: list[Cell], results_dir: Path, folder: Path,
            config_of: Callable[[Cell], dict[str, Any]] | None, log: Callable[[str], None] = print,
            check_own: bool = True) -> int:
    """Put back, as finished trials with their run directories, the records of `cells` that this
    study has not finished; return how many were put back.

    With `config_of`, a record counts only if its config equals `config_of(cell)` on every key
    that changes a result, and a cell without a record of its own takes the record of the same
    run from another cell of this folder (a fully supervised reference is one run at every
    labels-per-class value) or from another study's folder beside this one (e.g.
    `label_fraction` at 0.1 and the benchmark at 0.1 are one run). Without it, or with
    `check_own` off (a report shows the runs its folder holds, each with its config in runs.csv),
    the folder's own records are put back as they are."""
    done = finished_trials(study)
    shelf = Shelf(Path(folder).parents[1]) if config_of is not None else None
    restored, shared, stale, seeds = 0, set(), [], 0
    for cell in cells:
        if cell.key in done:
            continue
        if config_of is None:
            path = record_path(folder, cell.key)
            record = load_record(path) if path.is_file() else None
        else:
            path, record, diff = find_record(folder, cell.key, config_of(cell), shelf, check_own)
            if diff:
                stale.append(f"{cell.key} ({diff})")
            if record is not None and path != record_path(folder, cell.key):
                shared.add(path.parents[1].relative_to(shelf.root).as_posix())
        if record is None:
            continue
        run_id = _put_back(results_dir, record, path)
        add_finished(study, spec, cell, float(record["value"]), {**record.get("trial", {}), "run_id": run_id,
                                                                 "restored_from": str(path)}, cell.seed + 1)
        restored += 1
        seeds = max(seeds, cell.seed + 1)
    if seeds:
        study.set_user_attr("seeds", max(study.user_attrs.get("seeds", 0), seeds))
    if restored:
        log(f"{restored} finished cell(s) restored from run records"
            + (f" ({', '.join(sorted(shared))} held the same runs for some)" if shared else f" in {Path(folder) / 'runs'}"))
    if stale:
        log(f"{len(stale)} run record(s) no longer match their cell's config and run again: " + "; ".join(stale[:5])
            + (" ..." if len(stale) > 5 else ""))
    return restored


def add_finished(study, spec: StudySpec, cell: Cell, value: float, attrs: dict[str, Any], seeds: int) -> None:
    """A COMPLETE trial for `cell` whose run was trained elsewhere (a record, or another cell
    of this study that is the same run): `attrs` are that run's trial attributes (its run_id
    among them), relabelled as this cell's."""
    attrs = {**{k: v for k, v in attrs.items() if not k.startswith("axis.")},
             "cell": cell.key, "method": cell.method, "seed": cell.seed, "variant": cell.variant,
             **{f"axis.{a}": v for a, v in cell.axes}}
    params = spec.params(cell, seeds)
    if not _compatible(study, {k: d for k, (_, d) in params.items()}):
        params = {}  # the study's earlier trials used another grid: the cell stays in user attrs
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=value, user_attrs=attrs,
                                              params={k: v for k, (v, _) in params.items()},
                                              distributions={k: d for k, (_, d) in params.items()}))


def same_runs(cells: list[Cell], config_of: Callable[[Cell], dict[str, Any]]) -> dict[str, str]:
    """Each cell that is the same run as an earlier cell of `cells` (an equal config on every key
    that changes a result), mapped to that earlier cell's key: it is trained once, for both."""
    first: dict[str, str] = {}
    twins: dict[str, str] = {}
    for cell in cells:
        seen = first.setdefault(json.dumps(identity(config_of(cell)), sort_keys=True, default=str), cell.key)
        if seen != cell.key:
            twins[cell.key] = seen
    return twins


def find_record(folder: Path, key: str, config: dict[str, Any], shelf: "Shelf",
                check_own: bool = True) -> tuple[Path, dict | None, str]:
    """The record of the run `config` resolves to, for cell `key` of `folder`: its own record
    while it still matches (unchecked with `check_own` off), else the same run recorded under
    another cell or study on `shelf`; with how a stale own record differs ('' if it does not)."""
    now, path, stale = identity(config), record_path(folder, key), ""
    record = load_record(path) if path.is_file() else None
    if record is not None and check_own:
        then = identity(record["files"].get("config.json") or {})
        diff = differing_keys(now, then)
        if diff:
            stale = ", ".join(f"{k}={then.get(k)!r}, now {now.get(k)!r}" for k in diff[:3])
            record = None
    if record is None:
        path, record = shelf.find(now)
    return path, record, stale


class Shelf:
    """Every run record of the report folders under `root` (a study's own folder among them),
    read once, found by config."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._records: list[tuple[Path, dict, dict]] | None = None

    def find(self, config: dict[str, Any]) -> tuple[Path, dict | None]:
        """The first record (by path) whose identity is `config`, or (Path(), None)."""
        if self._records is None:
            self._records = []
            for path in sorted(self.root.glob("*/*/runs/*.json")):
                try:
                    record = load_record(path)
                except UsageError:
                    continue  # a damaged record is its own cell's concern, reported where it is read
                self._records.append((path, record, identity(record["files"].get("config.json") or {})))
        for path, record, cfg in self._records:
            if cfg == config:
                return path, record
        return Path(), None


def load_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
        if not isinstance(record["files"], dict):
            raise TypeError
        float(record["value"])
        return record
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"run record {path} is unreadable; restore it from git or delete it to rerun "
                         f"its cell") from None


def cells_on_record(folder: Path) -> list[Cell]:
    """The cells a report folder holds records of, read from each record's cell key (an
    unreadable record is skipped here; restoring it names it)."""
    cells = []
    for path in sorted((Path(folder) / "runs").glob("*.json")):
        try:
            cells.append(Cell.parse(json.loads(path.read_text())["cell"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return cells


def recorded_seeds(folder: Path, cells: list[Cell] | None = None) -> int:
    """One more than the largest seed among a report folder's records (0 without records)."""
    return max((c.seed for c in (cells_on_record(folder) if cells is None else cells)), default=-1) + 1


def _put_back(results_dir: Path, record: dict, path: Path) -> str:
    """The record's run directory under <results_dir>/runs, named by its content (never a number,
    so it cannot collide with a run Sacred numbers), written whole before it appears."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:10]
    run_id = f"record-{digest}"
    final = Path(results_dir) / "runs" / run_id
    if (final / RESTORED).is_file():  # content-named: put back before (by this or another worker)
        return run_id
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_id}.", dir=final.parent))
    try:
        for name, content in record["files"].items():
            if content:
                (tmp / name).write_text(json.dumps(content, indent=2))
        (tmp / RESTORED).write_text(json.dumps({"from": str(path), "run_id": record.get("run_id"),
                                                "val_images": record.get("val_images")}, indent=2))
        tmp.rename(final)
    except OSError:
        if not (final / RESTORED).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return run_id


def _compatible(study, distributions: dict) -> bool:
    from optuna.distributions import check_distribution_compatibility
    known: dict = {}
    for t in study.get_trials(deepcopy=False):
        known.update(t.distributions)
    try:
        for name, d in distributions.items():
            if name in known:
                check_distribution_compatibility(known[name], d)
    except ValueError:
        return False
    return True


