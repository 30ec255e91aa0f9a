"""`bench study` and `bench report`: validate everything up front, then sweep and report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from bench.data.dataset import DATASETS
from bench.data.sources import load_for, prepare_cache_dir
from bench.errors import Interrupted, UsageError
from bench.run.prepare import check_feasible, check_world
from bench.study.records import cells_on_record, recorded_seeds, restore
from bench.study.report import report_dir, write_report
from bench.study.spec import StudySpec, load_study, parse_values
from bench.study.claims import read_board
from bench.study.storage import default_storage, open_storage, study_name
from bench.study.plan import auto_preset, built_stages, describe, device_rate
from bench.study.sweep import Sweep
from bench.distributed.world import pick_device
from bench.run.tracking import prepare_runs_dir


def _datasets(spec: StudySpec, dataset: str | None) -> list[str]:
    if dataset is not None:
        if dataset not in DATASETS:
            raise UsageError(f"unknown dataset '{dataset}'; use one of {', '.join(DATASETS)}")
        return [dataset]
    if spec.datasets:
        return list(spec.datasets)
    raise UsageError(f"study {spec.name} needs --dataset (one of {', '.join(DATASETS)})")


def _spec(args: argparse.Namespace) -> StudySpec:
    """The study of the command line, cut to its --methods and --values."""
    return load_study(args.study).cut(args.methods, parse_values(args.values), args.variants)


def run_study(args: argparse.Namespace, overrides: dict[str, Any], argv: list[str] | None = None) -> int:
    spec = _spec(args)
    if args.workers < 1 or (args.seeds is not None and args.seeds < 1) or args.heartbeat <= 0 \
            or args.gpus_per_trial < 1:
        raise UsageError("--workers, --seeds and --gpus-per-trial must be >= 1 and --heartbeat > 0; fix the value")
    check_gpus(args.workers if args.launcher == "local" else 1, args.gpus_per_trial)
    preset, preset_note = args.preset or spec.preset, ""
    if preset is None:  # resolved once here: SLURM workers and cells are handed this one
        from bench.distributed import slurm
        preset, preset_note = auto_preset(args.launcher, slurm.parse_options(args.slurm))
        argv = [*(argv or []), "--preset", preset]
    results_dir = Path(args.results_dir)
    cli = {**overrides, **({"data": args.data} if args.data else {})}
    datasets = _datasets(spec, args.dataset)
    specs = {d: spec.for_dataset(d) for d in datasets}
    for dataset in datasets:  # the plan, before anything is read or written
        cells = specs[dataset].cells(args.seeds)
        cfgs = [specs[dataset].config(c, dataset, preset, {**cli, "results_dir": str(results_dir)}) for c in cells]
        recorded = recorded_cells(specs[dataset], dataset, preset, cells, cfgs, results_dir, args)
        print(describe(specs[dataset], dataset, preset, preset_note, cells, cfgs, recorded, built_stages(results_dir),
                       device_rate(pick_device(cfgs[0]["device"])), args.workers), flush=True)
    if args.plan:
        return 0
    # Every cell's config is resolved (validated) and the data loaded before anything is written.
    for dataset in datasets:
        cells = specs[dataset].cells(args.seeds)
        cfgs = [specs[dataset].config(c, dataset, preset, {**cli, "results_dir": str(results_dir)}) for c in cells]
        cfg = cfgs[0]
        cache = prepare_cache_dir(cfg["cache_dir"], option="--set cache_dir=PATH")
        data = load_for(cfg, cache, progress=args.progress)
        for cell, cell_cfg in zip(cells, cfgs):  # a cell that cannot work stops the study before it starts
            try:
                check_world(cell_cfg, args.gpus_per_trial)
                check_feasible(cell_cfg, data, cache)
            except UsageError as e:
                raise UsageError(f"cell {cell.key}: {e}") from None
    prepare_runs_dir(results_dir)
    storage = args.storage or default_storage(results_dir)
    for dataset in datasets:  # finished cells recorded in the report folder (another session's, machine's) count as done
        spec_d = specs[dataset]
        study = optuna.create_study(study_name=study_name(spec_d, dataset, preset), storage=open_storage(storage),
                                    load_if_exists=True, direction="maximize")
        restore(study, spec_d, spec_d.cells(args.seeds), results_dir,
                report_dir(spec_d, results_dir, dataset, preset, args.report_dir),
                lambda c, s=spec_d, d=dataset: s.config(c, d, preset, {**cli, "results_dir": str(results_dir)}))
    if args.launcher == "slurm":
        return run_on_slurm(args, argv or [], specs, storage, results_dir, preset, cli)
    interrupted = None
    for dataset in datasets:
        spec = specs[dataset]
        cells = spec.cells(args.seeds)
        sweep = Sweep(spec, dataset, preset, cells, storage, results_dir, cli=overrides, data=args.data,
                      workers=args.workers, heartbeat=args.heartbeat, progress=args.progress,
                      gpus_per_trial=args.gpus_per_trial, plugins=tuple(args.plugin))
        # the seeds a full report lists: a cut to some seeds never shrinks what earlier runs hold
        sweep.study.set_user_attr("preset", f"{preset} ({preset_note})" if preset_note else preset)
        sweep.study.set_user_attr("seeds", max(sweep.study.user_attrs.get("seeds", 0),
                                               max(c.seed for c in cells) + 1))
        with sweep.signals():  # a stop request ends the cells; the report so far is still written
            counts = sweep.run()
            out = report_whole(args, spec, sweep.study, dataset, preset, results_dir, cli)
        if counts is None:
            done = sum(read_board(sweep.study, sweep.grace).done(c.key) for c in cells)
            interrupted = (f"study {sweep.name} stopped with {done}/{len(cells)} cells done; running cells "
                           f"were checkpointed; report so far in {out}; rerun the same command to continue")
            break
        print(f"\n{(out / 'table.md').read_text().rstrip()}\n" if (out / "table.md").is_file() else "", end="")
        print(f"study {sweep.name}: {counts['done']}/{counts['cells']} cells done, {counts['failed']} failed "
              f"this time; report in {out} (table.md, figure.png, curves.png; runs.csv holds every run)")
        if sweep.stop_requested and dataset != datasets[-1]:  # asked to stop while the report was written
            interrupted = f"study stopped after {dataset}; rerun the same command to continue with the next dataset"
            break
    if interrupted:
        raise Interrupted(interrupted)
    return 0


def report_whole(args: argparse.Namespace, cut: StudySpec, study, dataset: str, preset: str | None,
                 results_dir: Path, cli: dict[str, Any]) -> Path:
    """The report of the whole study, grown by what the cut added, from the store and the report
    folder's records (each checked against its cell's config): running one method of a study
    never drops the others' rows from the report it shares with them."""
    folder = report_dir(cut, results_dir, dataset, preset, args.report_dir)
    recorded = cells_on_record(folder)  # each record read once, here; restore reads only those it puts back
    try:
        whole = load_study(args.study).for_dataset(dataset).with_cut(cut, recorded)
    except UsageError:  # the study file has no values of its own for this dataset: the cut is all there is
        whole = cut
    try:
        seeds = max(study.user_attrs.get("seeds") or args.seeds or 0, recorded_seeds(folder, recorded))
        cells = whole.cells(seeds or None)
        restore(study, whole, cells, results_dir, folder,
                lambda c: whole.config(c, dataset, preset, {**cli, "results_dir": str(results_dir)}), log=lambda _: None)
    except UsageError as e:  # another cell's record is damaged: this run's cells are still reported and recorded
        print(f"warning: the report shows only this run's cells: {e}", file=sys.stderr)
        whole, cells = cut, cut.cells(args.seeds)
    return write_report(whole, study, cells, results_dir, dataset, preset, args.report_dir)


def recorded_cells(spec: StudySpec, dataset: str, preset: str | None, cells: list, cfgs: list, results_dir: Path,
                   args: argparse.Namespace) -> set[str]:
    """The cells already finished, read without writing: in the study's store (where one exists)
    or as a record whose config is the cell's, the cell's own or, as the run would take it,
    another cell's or another published study's."""
    from bench.study.records import Shelf, find_record, finished_trials
    done: set[str] = set()
    url = args.storage or default_storage(results_dir)
    if "://" in url or Path(url).exists():
        try:
            done |= set(finished_trials(optuna.load_study(study_name=study_name(spec, dataset, preset),
                                                          storage=open_storage(url))))
        except KeyError:
            pass  # no such study in the store yet
    folder = report_dir(spec, results_dir, dataset, preset, args.report_dir)
    shelf = Shelf(folder.parents[1])
    for cell, cfg in zip(cells, cfgs):
        if cell.key not in done and find_record(folder, cell.key, cfg, shelf)[1] is not None:
            done.add(cell.key)
    return done


def check_gpus(workers: int, per_trial: int) -> None:
    """Every worker's cells get `per_trial` GPUs of their own, where this machine has GPUs."""
    import torch
    if per_trial > 1 and torch.cuda.is_available() and workers * per_trial > torch.cuda.device_count():
        raise UsageError(f"--workers {workers} x --gpus-per-trial {per_trial} needs {workers * per_trial} GPUs, "
                         f"{torch.cuda.device_count()} are visible; lower one of them")


def run_on_slurm(args: argparse.Namespace, argv: list[str], specs: dict, storage: str, results_dir: Path,
                 preset: str | None, cli: dict[str, Any]) -> int:
    """Submit --workers SLURM jobs, each one worker of this very study, wait, then report."""
    from bench.options import strip_flag
    from bench.distributed import slurm
    worker = strip_flag(strip_flag(strip_flag(list(argv), "--launcher"), "--slurm"), "--workers")
    worker += ["--launcher", "local", "--workers", "1", "--no-progress"]
    if "--storage" not in argv:
        worker += ["--storage", storage]
    folder = results_dir / "slurm"
    jobs = slurm.submit_workers(worker, args.workers, folder, slurm.parse_options(args.slurm))
    print(f"study {spec_names(specs)}: {len(jobs)} SLURM job(s) {', '.join(j.job_id for j in jobs)}; logs in "
          f"{folder}", flush=True)
    bad = slurm.wait(jobs)
    for line in bad:
        print(f"warning: {line}", file=sys.stderr)
    for dataset, spec in specs.items():
        study = optuna.load_study(study_name=study_name(spec, dataset, preset), storage=open_storage(storage))
        cells = spec.cells(args.seeds)
        out = report_whole(args, spec, study, dataset, preset, results_dir, cli)
        done = sum(read_board(study, 4 * args.heartbeat).done(c.key) for c in cells)
        print(f"study {study.study_name}: {done}/{len(cells)} cells done; report in {out}")
    return 0 if not bad else 1


def spec_names(specs: dict) -> str:
    return next(iter(specs.values())).name


def report_study(args: argparse.Namespace) -> int:
    """Report from the study's store and from the run records in its report folders; the store
    is only read (records fill an in-memory copy). The folder's own records need no config check
    (a report shows the runs it holds, each with its config in runs.csv); a cell they lack takes
    the same run from another study's records when its config equals the cell's at the preset."""
    spec = _spec(args)
    results_dir = Path(args.results_dir)
    url = args.storage or default_storage(results_dir)
    stored: dict[tuple[str, str], str] = {}
    if "://" in url or Path(url).exists():
        storage = open_storage(url)
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
            if s.study_name.startswith(f"{spec.name}:"):
                _, dataset, preset = s.study_name.split(":", 2)
                if (args.dataset is None or dataset == args.dataset) and (args.preset is None or preset == args.preset):
                    stored[(dataset, preset)] = s.study_name
    recorded = _recorded(spec, results_dir, args)
    targets = list(stored) + [t for t in recorded if t not in stored]
    if not targets and args.dataset and args.preset:  # no runs of its own: other studies' records may hold them
        targets = [(args.dataset, args.preset)]
    if not targets:
        where = f"runs of study {spec.name} in {url}" if ("://" in url or Path(url).exists()) \
            else f"study store at {url}"
        raise UsageError(f"no {where}{' for ' + args.dataset if args.dataset else ''} and no run records under "
                         f"{report_dir(spec, results_dir, 'x', None, args.report_dir).parent}; run "
                         f"`bench study {spec.name}` first or pass --results-dir / --storage / --report-dir")
    for dataset, preset in targets:
        dspec = spec.for_dataset(dataset)
        name_preset = None if preset == "default" else preset
        study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")
        seeds = 0
        if (dataset, preset) in stored:
            source = optuna.load_study(study_name=stored[(dataset, preset)], storage=storage)
            seeds = source.user_attrs.get("seeds", 0)
            for t in source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=t.value,
                                                          user_attrs=t.user_attrs))
        folder = report_dir(dspec, results_dir, dataset, name_preset, args.report_dir)
        recorded = cells_on_record(folder)
        dspec = dspec.with_cut(dspec, recorded)  # the values and methods earlier cuts added stay in the report
        seeds = max(seeds, recorded_seeds(folder, recorded))
        cells = dspec.cells(seeds or None)
        restore(study, dspec, cells, results_dir, folder,
                lambda c, d=dspec, ds=dataset, p=name_preset: d.config(c, ds, p, {"results_dir": str(results_dir)}),
                check_own=False)
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            raise UsageError(f"no finished runs of study {spec.name} on {dataset} ({preset}) in {url} or in any "
                             f"run records under {folder.parents[1]}; run `bench study {spec.name}` first")
        out = write_report(dspec, study, cells, results_dir, dataset, name_preset, args.report_dir)
        print(f"report of {study_name(dspec, dataset, name_preset)}: {out}")
    return 0


def _recorded(spec: StudySpec, results_dir: Path, args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(dataset, preset) of every report folder of this study that holds run records, as
    --dataset / --preset select them."""
    under = report_dir(spec, results_dir, "x", None, args.report_dir).parent
    out = []
    for folder in sorted(under.glob("*-*")) if under.is_dir() else []:
        dataset, _, preset = folder.name.partition("-")
        if not any((folder / "runs").glob("*.json")) or dataset not in DATASETS:
            continue
        if (args.dataset is None or dataset == args.dataset) and (args.preset is None or preset == Path(args.preset).stem):
            out.append((dataset, args.preset or preset))
    return out
