"""`bench tune`: TPE search over a method's hyperparameters on validation accuracy.

Each trial is one tracked Sacred run (in this process) whose validation accuracy is reported
at every evaluation, so the median pruner stops hopeless trials early. The objective is the
validation accuracy of the checkpoint selected on validation; the test set plays no part. The
best parameters are printed and written as a preset file that `bench run --preset FILE` takes.

`--trials N` is the number of finished (complete or pruned) trials the search should hold: a
rerun, on this machine or any other that has its storage, runs only the missing ones, and
`--stop-after MINUTES` starts no trial after that long, so a search runs in pieces that fit a
session or a SLURM time limit. With `--report-dir DIR` the search lives in
`DIR/tune/<method>-<dataset>-<preset>/` (its Optuna journal, every trial as a table, history,
curves and importance figures, the best preset), so a search kept in git spans sessions. A trial
whose tuner died (no heartbeat) is failed and retried.
"""
from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from bench.config import all_options, load_preset, method_layer, resolve
from bench.errors import NonFiniteLoss, UsageError
from bench.io import atomic_write_text, read_json
from bench.method.base import get_method
from bench.run.provenance import redact
from bench.study.report import pseudo_label_health
from bench.study import claims
from bench.study.storage import default_storage, open_storage
from bench.run.tracking import SacredInterrupt, prepare_runs_dir, runs_dir
from bench.study.tune_report import write_search_report

LOW_ADMISSION = 0.01  # a best trial admitting less than this share of unlabeled images is flagged

# name: (low, high, log) for floats; lists are categorical choices. Only the options a method
# has are searched; label smoothing only where no confidence threshold depends on it.
DEFAULT_SPACE: dict[str, Any] = {
    "lr": (1e-4, 3e-3, True), "weight_decay": (0.005, 0.3, True), "label_smoothing": (0.0, 0.2, False),
    "ema_decay": (0.99, 0.9999, True), "tau": (0.5, 0.95, False), "lambda_u": (0.5, 5.0, True),
    "mask_ratio": (0.5, 0.9, False), "lambda_rec": (0.1, 2.0, True), "confidence": (0.7, 0.99, False),
    "gate_threshold": (40.0, 90.0, False), "pretrain_mask_ratio": (0.5, 0.9, False),
}


def load_space(path: str | None, options: dict, method_cls=None) -> dict[str, Any]:
    if path is None:
        skip = {"label_smoothing"} if method_cls is not None and method_cls.pseudo_labels else set()
        return {k: v for k, v in DEFAULT_SPACE.items() if k in options and k not in skip}
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"--space {path}: cannot read it as YAML ({type(e).__name__}); fix the file") from None
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"--space {path}: expected {{option: {{low, high, log}} | {{choices: [...]}}}}")
    space = {}
    for name, spec in raw.items():
        if name not in options:
            raise UsageError(f"--space {path}: '{name}' is not an option of this method; see `bench run M --help`")
        if isinstance(spec, dict) and "choices" in spec and isinstance(spec["choices"], list):
            space[name] = list(spec["choices"])
        elif isinstance(spec, dict) and {"low", "high"} <= set(spec) and float(spec["low"]) < float(spec["high"]):
            space[name] = (float(spec["low"]), float(spec["high"]), bool(spec.get("log", False)))
        else:
            raise UsageError(f"--space {path}: '{name}' needs low < high (and optional log) or choices")
    return space


def suggest(trial: optuna.Trial, space: dict[str, Any], options: dict) -> dict[str, Any]:
    params = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            params[name] = trial.suggest_categorical(name, spec)
        elif options[name].kind is int:
            params[name] = trial.suggest_int(name, int(spec[0]), int(spec[1]), log=spec[2])
        else:
            params[name] = trial.suggest_float(name, spec[0], spec[1], log=spec[2])
    return params


def corners(space: dict[str, Any], options: dict) -> list[dict[str, Any]]:
    """Every combination of each range's ends and each list's choices."""
    axes = []
    for name, spec in space.items():
        ends = spec if isinstance(spec, list) else [spec[0], spec[1]]
        if not isinstance(spec, list) and options[name].kind is int:
            ends = [int(e) for e in ends]
        axes.append([(name, v) for v in ends])
    return [dict(combo) for combo in itertools.product(*axes)]


def check_space(method_cls, base: dict[str, Any], space: dict[str, Any], options: dict, preset: str | None,
                cli: dict[str, Any]) -> None:
    """Every trial must be able to work: the space's corners (where thresholds, smoothing and
    schedules are at their extremes) are checked like a run, before any trial starts."""
    from bench.data.sources import load_for, prepare_cache_dir
    from bench.run.prepare import check_feasible
    cache = prepare_cache_dir(base["cache_dir"], option="--set cache_dir=PATH")
    data = load_for(base, cache, progress=base["progress"])
    check_feasible(base, data, cache)
    for corner in corners(space, options)[:4096]:
        try:
            check_feasible(resolve(method_cls, preset=preset, study=corner, cli=cli), data, cache)
        except UsageError as e:
            where = ", ".join(f"{k}={v}" for k, v in corner.items())
            raise UsageError(f"the search space reaches configs that cannot work ({where}): {e}; narrow "
                             f"the space with --space") from None


class Pruned(optuna.TrialPruned, SacredInterrupt):
    """The pruner stopped the trial: optuna marks it PRUNED, and its Sacred run records PRUNED
    too rather than FAILED with a traceback, so a browse of the runs shows no false failures."""
    STATUS = "PRUNED"


def tune(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from bench.run.runner import execute
    method_cls = get_method(args.method)
    options = all_options(method_cls)
    space = load_space(args.space, options, method_cls)
    if not space:
        raise UsageError(f"nothing to search for {method_cls.name}; pass --space FILE")
    if args.trials < 1:
        raise UsageError("--trials must be >= 1; it is the number of finished trials the search should hold")
    if args.stop_after is not None and args.stop_after <= 0:
        raise UsageError("--stop-after must be > 0 minutes; fix the value or leave it out to run every trial")
    if args.heartbeat <= 0:
        raise UsageError("--heartbeat must be > 0 seconds; fix the value")
    cli = {**overrides, "dataset": args.dataset, "results_dir": args.results_dir, "progress": args.progress,
           **({"data": args.data} if args.data else {})}
    base = resolve(method_cls, preset=args.preset, cli=cli)  # reject bad input before anything is written
    if base["pl_mode"] != "on" or "pl_mode" in space:
        # an oracle reads the pool's true labels; a control is a reference, not a recipe to pick
        raise UsageError(f"bench tune searches recipes on validation with --pl-mode on only (here: "
                         f"{'searched' if 'pl_mode' in space else base['pl_mode']}); the oracle and the control are "
                         f"references of a study (`references: [oracle, control]`), never tuned")
    name = f"tune:{method_cls.name}:{args.dataset}:{args.preset or 'default'}"
    folder = search_dir(args, method_cls.name)
    url = args.storage or (str(folder / "search.journal") if args.report_dir else default_storage(args.results_dir))
    print(tune_plan(base, name, url, args.trials), flush=True)  # before the data is read or anything written
    if args.plan:
        return 0
    check_space(method_cls, base, space, options, args.preset, cli)
    prepare_runs_dir(args.results_dir)
    study = optuna.create_study(study_name=name, storage=open_storage(url), load_if_exists=True,
                                direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    # seeded by what the storage holds: a search resumed in a new process would otherwise replay
    # its first trials' random draws and spend trials on configs it already ran
    study.sampler = optuna.samplers.TPESampler(seed=len(study.get_trials(deepcopy=False)))
    claims.fail_stale(study, claims.HEARTBEATS_OF_GRACE * args.heartbeat, "tuner lost: no heartbeat")

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space, options)
        cfg = resolve(method_cls, preset=args.preset, study=params, cli=cli)

        def report(step: int, val: dict[str, float]) -> None:
            trial.report(max(val["val_acc"], val["val_acc_ema"]), step)
            if trial.should_prune():
                raise Pruned(f"pruned at step {step}")

        with claims.Heartbeat(study, trial, args.heartbeat):
            run_id, result = execute(cfg, on_validation=report,
                                     info={"optuna": {"study": name, "trial": trial.number, "storage": redact(url)}})
        trial.set_user_attr("run_id", run_id)
        trial.set_user_attr("test_acc_selected", result["test_acc_selected"])  # recorded, never optimised
        metrics = read_json(runs_dir(cfg["results_dir"]) / run_id / "metrics.json")
        for key, value in pseudo_label_health(metrics, result.get("steps")).items():
            if not math.isnan(value):  # a semi-supervised trial's admission shows beside its accuracy
                trial.set_user_attr(key, value)
        return result["selected_val_acc"]

    held = held_trials(study)
    if held < args.trials:
        print(f"search {name}: {held} of {args.trials} trials finished; running {args.trials - held}; "
              f"storage {redact(url)}")
    started = time.monotonic()
    # one trial at a time, recounting the storage: tuners sharing it stop at --trials together, and
    # --stop-after ends a session's piece between trials, never inside one. A failed trial uses up
    # its attempt (as optuna's n_trials counts it), so a method that always diverges cannot loop.
    for _ in range(args.trials - held):
        held = held_trials(study)
        if held >= args.trials:
            break
        if args.stop_after is not None and time.monotonic() - started > 60 * args.stop_after:
            print(f"stopped after {args.stop_after:g} minutes (--stop-after): {held} of {args.trials} trials "
                  f"finished; the same command runs the rest")
            break
        study.optimize(objective, n_trials=1, catch=(NonFiniteLoss,))
    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not finished:
        print(f"no trial of {name} completed; see the failed runs under {args.results_dir}/runs")
        return 1
    best = study.best_trial
    base = method_layer(load_preset(args.preset)[1], method_cls.name, "preset")
    preset = {**base, **{k: v for k, v in overrides.items()}, **best.params}
    out = Path(args.results_dir) / "tuned" / f"{method_cls.name}-{args.dataset}.yaml"
    header = (f"# bench tune {method_cls.name} --dataset {args.dataset} --preset {args.preset}: trial "
              f"{best.number}, validation accuracy {best.value:.2f}\n")
    atomic_write_text(out, header + yaml.safe_dump(preset, sort_keys=True))
    if args.report_dir:
        atomic_write_text(folder / "best.yaml", header + yaml.safe_dump(preset, sort_keys=True))
    written = write_search_report(study, folder)
    comparison = write_comparison(folder, method_cls.name, args, overrides, best.params)
    print(f"best of {len(study.trials)} trials (trial {best.number}, validation accuracy {best.value:.2f}):")
    for k, v in best.params.items():
        print(f"  {k}: {v}")
    admitted = best.user_attrs.get("pl_rate")
    if admitted is not None and admitted < LOW_ADMISSION:
        print(f"warning: the best trial admitted {100 * admitted:.1f} % of the unlabeled images over its last "
              f"tenth of training: it trains almost as a supervised run; compare it with `bench run supervised` "
              f"before calling it a semi-supervised recipe")
    print(f"preset written to {out}; use it with `bench run {method_cls.name} --preset {out}`")
    print(f"the search's trials and figures ({', '.join(w for w in written if not w.endswith('.pdf'))}) are in "
          f"{folder}; browse it: optuna-dashboard {redact(url)}")
    data = f" --data {args.data}" if args.data else ""
    report = f" --report-dir {args.report_dir}" if args.report_dir else ""
    print(f"compare it with the preset it started from, paired by seed on test accuracy:\n"
          f"  bench study {comparison} --dataset {args.dataset}{data}{report}")
    return 0


def tune_plan(base: dict[str, Any], name: str, url: str, trials: int) -> str:
    """How many trials are left and what they cost on this device (bench.study.plan's estimate;
    a pruned trial stops early, so this is the most it takes)."""
    from bench.distributed.world import pick_device
    from bench.study.plan import OVERHEAD, cell_parts, device_rate, hours
    held = 0
    if "://" in url or Path(url).exists():
        try:
            held = held_trials(optuna.load_study(study_name=name, storage=open_storage(url)))
        except KeyError:
            pass
    rate, label, path, _ = device_rate(pick_device(base["device"]))
    per_trial = OVERHEAD * sum(p["flops"] for p in cell_parts(base)) / rate
    left = max(trials - held, 0)
    return (f"plan: {name}: {trials} trials, {held} already finished; about {hours(per_trial)} per trial (stages "
            f"included, before pruning), {hours(left * per_trial)} for the {left} left on this device ({label}: "
            f"{rate / 1e9:.1f} GFLOP/s measured, x{OVERHEAD}; the rate is cached in {path})")


def held_trials(study: optuna.Study) -> int:
    """Trials that count towards --trials: complete or pruned (failed ones are retried)."""
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


def write_comparison(folder: Path, method: str, args: argparse.Namespace, overrides: dict[str, Any],
                     params: dict[str, Any]) -> Path:
    """A study file beside the search: the method as its preset runs it (variant `preset`) against
    the same runs with the best trial's parameters (variant `tuned`, what best.yaml resolves to),
    paired by seed. The parameters were chosen on validation; here the test set only evaluates.
    The `preset` cells are the preset's own runs, so a published study's records supply them."""
    spec = {
        "description": f"{method} tuned by `bench tune` (variant tuned: best.yaml's parameters) against the "
                       f"preset it searched from (variant preset), paired by seed; chosen on validation only.",
        "methods": [method], "datasets": [args.dataset], "fixed": dict(overrides),
        "variants": {"preset": {}, "tuned": dict(params)}, "seeds": 2, "metric": "test_acc",
        "compare_to": {"variant": "preset"}, "figure": {"kind": "bar"},
        "budget": "equal: both variants run the preset's steps; the search's own trials (trials.csv) come on "
                  "top of the tuned variant",
        **({"preset": args.preset} if args.preset else {}),
    }
    path = folder / f"tuned_{method}.yaml"
    atomic_write_text(path, yaml.safe_dump(spec, sort_keys=False))
    return path


def search_dir(args: argparse.Namespace, method: str) -> Path:
    """Where a search's record lives: <report-dir>/tune/<method>-<dataset>-<preset>/, or
    <results-dir>/tuned/<method>-<dataset>-<preset>/ without --report-dir."""
    stem = f"{method}-{args.dataset}-{Path(args.preset).stem if args.preset else 'default'}"
    return Path(args.report_dir) / "tune" / stem if args.report_dir else Path(args.results_dir) / "tuned" / stem


