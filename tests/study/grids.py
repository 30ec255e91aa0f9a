"""A tiny study grid and readers of its store, shared by the study tests."""
import time

import optuna
from optuna.trial import TrialState

from helpers import load_json, run_dirs, start_bench

FAST = ["--preset", "smoke", "--no-progress", "--set", "steps=20", "--set", "eval_every=10",
        "--set", "ckpt_every=10", "--set", "log_every=5"]


def write_study(tmp_path, seeds=2, lrs=(0.002, 0.004)):
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
description: a 2 x 2 grid for tests
methods: [supervised]
axes:
  label_fraction: {{values: [0.2, 0.4]}}
  lr: {{values: [{', '.join(map(str, lrs))}]}}
seeds: {seeds}
metric: test_acc_ema
figure: {{kind: line, x: label_fraction, hue: lr}}
""")
    return path


def trials(storage, name):
    if "://" not in str(storage):
        from optuna.storages.journal import JournalFileBackend
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(storage)))
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def completed_per_cell(ts):
    counts = {}
    for t in ts:
        if t.state == TrialState.COMPLETE:
            counts[t.user_attrs["cell"]] = counts.get(t.user_attrs["cell"], 0) + 1
    return counts


def completed_runs(results):
    # a run directory exists a moment before its record: polled mid-study, it is not complete yet
    return [r for r in run_dirs(results)
            if (r / "run.json").exists() and load_json(r / "run.json").get("status") == "COMPLETED"]


def start_study_until(args, tmp_path, ready, timeout=300):
    """Start `bench study args` and return its process once `ready()` holds."""
    proc = start_bench(args, tmp_path / "cache")
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline and proc.poll() is None, "the study did not get going"
        time.sleep(0.1)
    return proc


def running_with_checkpoint(results):
    return [r for r in run_dirs(results) if (r / "checkpoint.pt").exists()
            and (r / "run.json").exists() and load_json(r / "run.json").get("status") == "RUNNING"]
