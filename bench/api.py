"""The Python API: run, study and report from a notebook, with the command line's validation and
defaults, returning results and the report's tables as pandas frames.

    from bench import api
    result = api.run("fixmatch", preset="smoke", steps=50)           # one tracked run
    report = api.study("benchmark", dataset="synthetic", preset="smoke", seeds=1)
    report.summary                                                   # a DataFrame per table
    api.export(result.run_dir, "exported/")                          # a folder timm loads

This module and `bench.method` (what a method file imports) are the stable public surface: the
modules behind them may move, these names may not. Bad input raises `bench.errors.UsageError`
with the one-line message the command line prints.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from bench.errors import UsageError

__all__ = ["RunResult", "Report", "run", "study", "report", "export", "load_plugins", "UsageError"]

REPORT_TABLES = ("summary", "table", "differences", "budget", "runs", "health")


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    result: dict[str, Any]   # run.json's result: accuracies, budget, minutes
    config: dict[str, Any]   # the resolved config saved with the run

    @property
    def curves(self) -> pd.DataFrame:
        """The run's logged curves (curves.csv): one row per (step, metric)."""
        return pd.read_csv(self.run_dir / "curves.csv")


@dataclass
class Report:
    folder: Path
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def __getattr__(self, name: str) -> pd.DataFrame:
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(f"no table '{name}' in {self.__dict__.get('folder')}; have {', '.join(tables)}")

    @property
    def markdown(self) -> str:
        return (self.folder / "table.md").read_text()


def load_plugins(plugins: Iterable[str]) -> None:
    """Register the methods of `--plugin` files or modules in this process."""
    from bench.method.plugins import load_plugin
    for spec in plugins:
        load_plugin(spec)


def run(method: str, *, preset: str | None = None, results_dir: str | Path = "results", resume: str | None = None,
        plugins: Iterable[str] = (), **options: Any) -> RunResult:
    """`bench run METHOD --preset P --results-dir R --OPTION VALUE ...` in this process; options
    are the run's options by their config names (`steps=200`, `label_fraction=0.01`)."""
    from bench.cli import train_config
    from bench.config import resolve
    from bench.method.base import get_method
    load_plugins(plugins)
    cfg = resolve(get_method(method), preset=preset, cli={**options, "results_dir": str(results_dir),
                                                           "progress": options.get("progress", False)})
    run_id, result = train_config(cfg, resume)
    from bench.run.tracking import runs_dir
    run_dir = runs_dir(results_dir) / str(run_id)
    return RunResult(str(run_id), run_dir, result, json.loads((run_dir / "config.json").read_text()))


def study(name: str, *, dataset: str | None = None, preset: str | None = None, results_dir: str | Path = "results",
          report_dir: str | Path | None = None, methods: Iterable[str] | None = None,
          values: dict[str, Iterable] | None = None, variants: Iterable[str] | None = None,
          seeds: int | None = None, data: str | None = None, workers: int = 1, plugins: Iterable[str] = (),
          progress: bool = False, **options: Any) -> Report:
    """`bench study NAME ...`: run the study's missing cells and return its report's tables."""
    from bench.cli import cmd_study
    argv = [name, *_study_argv(dataset, preset, results_dir, report_dir, methods, values, variants, plugins)]
    if seeds is not None:
        argv += ["--seeds", str(seeds)]
    if data is not None:
        argv += ["--data", str(data)]
    argv += ["--workers", str(workers), "--progress" if progress else "--no-progress"]
    for key, value in options.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    load_plugins(plugins)
    cmd_study(argv)
    return _read_report(name, dataset, preset, results_dir, report_dir)


def report(name: str, *, dataset: str, preset: str | None = None, results_dir: str | Path = "results",
           report_dir: str | Path | None = None, methods: Iterable[str] | None = None,
           values: dict[str, Iterable] | None = None, variants: Iterable[str] | None = None,
           plugins: Iterable[str] = ()) -> Report:
    """`bench report NAME ...`: rebuild the study's report from its store and records."""
    from bench.cli import cmd_report
    load_plugins(plugins)
    cmd_report([name, *_study_argv(dataset, preset, results_dir, report_dir, methods, values, variants, plugins)])
    return _read_report(name, dataset, preset, results_dir, report_dir)


def export(run_dir: str | Path, out: str | Path, final: bool = False) -> Path:
    """`bench export`: the run's classifier as a folder `timm.create_model("local-dir:OUT")` loads."""
    from bench.run.export import export_run
    return Path(export_run(Path(run_dir), Path(out), final)["out"])


def _study_argv(dataset, preset, results_dir, report_dir, methods, values, variants, plugins) -> list[str]:
    argv = ["--results-dir", str(results_dir)]
    if dataset is not None:
        argv += ["--dataset", dataset]
    if preset is not None:
        argv += ["--preset", str(preset)]
    if report_dir is not None:
        argv += ["--report-dir", str(report_dir)]
    if methods:
        argv += ["--methods", *methods]
    if variants:
        argv += ["--variants", *variants]
    for axis, vals in (values or {}).items():
        argv += ["--values", f"{axis}={','.join(json.dumps(v) for v in vals)}"]
    for plugin in plugins:
        argv += ["--plugin", str(plugin)]
    return argv


def _read_report(name: str, dataset: str | None, preset: str | None, results_dir, report_dir) -> Report:
    from bench.study.report import report_dir as folder_of
    from bench.study.spec import load_study
    spec = load_study(name)
    if dataset is None:
        if len(spec.datasets or []) != 1:
            raise UsageError(f"study {spec.name}: name the dataset whose report to read (dataset=...)")
        dataset = spec.datasets[0]
    folder = folder_of(spec, Path(results_dir), dataset, preset or spec.preset,
                       Path(report_dir) if report_dir is not None else None)
    tables = {t: pd.read_csv(folder / f"{t}.csv") for t in REPORT_TABLES if (folder / f"{t}.csv").is_file()}
    return Report(folder, tables)
