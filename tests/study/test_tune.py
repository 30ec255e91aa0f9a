"""`bench tune`: a TPE search whose best trial becomes a preset `bench run` accepts, kept in its
folder with its trials; a pruned trial's run is recorded as pruned."""
import signal
import time

import optuna
import pandas as pd
import pytest

from helpers import bench, kill, load_json, run_dirs, start_bench


def test_tune_saves_a_preset_that_run_accepts(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 0.001, high: 0.004, log: true}\ntau: {choices: [0.3, 0.95]}\n")
    results, published = tmp_path / "results", tmp_path / "published"
    args = ["tune", "fixmatch", "--preset", "smoke", "--space", str(space), "--set", "steps=20",
            "--set", "eval_every=10", "--results-dir", str(results), "--no-progress", "--report-dir", str(published)]
    out = bench([*args, "--trials", "3"], tmp_path / "cache", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    preset = results / "tuned" / "fixmatch-synthetic.yaml"
    import yaml
    values = yaml.safe_load(preset.read_text())
    assert values["steps"] == 20 and values["depth"] == 2
    run = bench(["run", "fixmatch", "--preset", str(preset), "--results-dir", str(tmp_path / "r2"),
                 "--no-progress"], tmp_path / "cache")
    assert run.returncode == 0, run.stderr[-2000:]
    assert load_json(run_dirs(tmp_path / "r2")[0] / "config.json")["lr"] == values["lr"]

    # the search lives in its folder: trials, figures, best preset; a rerun adds only what --trials lacks
    folder = published / "tune" / "fixmatch-synthetic-smoke"
    assert yaml.safe_load((folder / "best.yaml").read_text()) == values
    frame = pd.read_csv(folder / "trials.csv")
    assert len(frame) == 3 and set(frame["state"]) <= {"COMPLETE", "PRUNED"}
    # the median pruner waits for 3 trials before it prunes: the first ones complete
    done = frame[frame["state"] == "COMPLETE"]
    assert len(done) >= 1
    from bench.study.report import pseudo_label_health
    for _, t in done.iterrows():  # each trial's draw is the run's config; its admission, the run's curve's
        run = results / "runs" / str(int(t["user_attrs_run_id"]))
        assert load_json(run / "config.json")["lr"] == pytest.approx(t["params_lr"])
        health = pseudo_label_health(load_json(run / "metrics.json"), load_json(run / "run.json")["result"]["steps"])
        assert t["user_attrs_pl_rate"] == pytest.approx(health["pl_rate"])
    best = done.loc[done["value"].idxmax()]
    assert values["lr"] == pytest.approx(best["params_lr"])      # the preset written is the best trial's
    # a best trial that admits almost nothing (a supervised run in disguise) is flagged
    best_rate = best["user_attrs_pl_rate"]
    assert ("warning: the best trial admitted" in out.stdout) == (best_rate < 0.01), (best_rate, out.stdout)
    never = tmp_path / "never.yaml"  # a tau no 20-step model reaches: the flagged case, every time
    never.write_text("tau: {choices: [0.999]}\n")
    flagged = bench(["tune", "fixmatch", "--preset", "smoke", "--space", str(never), "--set", "steps=20",
                     "--set", "eval_every=10", "--results-dir", str(tmp_path / "r3"), "--no-progress", "--trials", "1"],
                    tmp_path / "cache", timeout=600)
    assert flagged.returncode == 0, flagged.stderr[-3000:]
    assert "warning: the best trial admitted 0.0 % of the unlabeled images" in flagged.stdout, flagged.stdout
    for name in ("history.png", "curves.png", "importance.png"):
        assert (folder / name).stat().st_size > 0, name
    assert len(run_dirs(results)) == 3

    # the comparison study beside it: variant `preset` is the preset's own run, `tuned` what best.yaml runs
    from bench.config import differing_keys, resolve
    from bench.method.base import get_method
    from bench.study.spec import load_study
    compare = folder / "tuned_fixmatch.yaml"
    assert f"bench study {compare}" in out.stdout
    spec = load_study(str(compare))
    assert spec.compare_to == {"variant": "preset"} and spec.seeds == 2 and spec.metric == "test_acc"
    configs = {}
    for cell in spec.cells():
        configs[cell.variant, cell.seed] = cfg = spec.config(cell, "synthetic", spec.preset, {})
        own = {"preset": str(preset)} if cell.variant == "tuned" else {
            "preset": "smoke", "cli": {"steps": 20, "eval_every": 10}}
        want = resolve(get_method("fixmatch"), preset=own["preset"],
                       cli={**own.get("cli", {}), "seed": cell.seed, "dataset": "synthetic"})
        assert set(differing_keys(cfg, want)) <= {"preset"}, cell  # the same run; only the preset's name differs
    assert "lr" in differing_keys(configs["tuned", 0], configs["preset", 0])
    paired = bench(["study", str(compare), "--values", "seed=0", "--results-dir", str(results), "--no-progress",
                    "--report-dir", str(published)], tmp_path / "cache", timeout=600)
    assert paired.returncode == 0, paired.stderr[-3000:]
    diffs = pd.read_csv(published / "tuned_fixmatch" / "synthetic-smoke" / "differences.csv")
    assert diffs["variant"].tolist() == ["tuned"] and diffs["n_pairs"].tolist() == [1], diffs
    assert len(run_dirs(results)) == 5
    # a piece of a search: --stop-after starts no trial once its minutes are spent (here after the
    # first); the resumed sampler draws new configs instead of replaying the first process's
    again = bench([*args, "--trials", "5", "--stop-after", "0.001"], tmp_path / "cache", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 of 5 trials finished; running 2" in again.stdout
    assert "stopped after 0.001 minutes (--stop-after): 4 of 5 trials finished" in again.stdout
    frame = pd.read_csv(folder / "trials.csv")
    assert len(run_dirs(results)) == 6 and len(frame) == 4
    assert frame["params_lr"].iloc[3] not in set(frame["params_lr"].iloc[:3]), frame["params_lr"]

    # a tuner killed mid-trial: its trial goes silent, is failed on the next start, and retried
    proc = start_bench([*args, "--set", "steps=2000", "--trials", "5", "--heartbeat", "0.5"], tmp_path / "cache")
    deadline = time.time() + 300
    while len(run_dirs(results)) < 7:
        assert time.time() < deadline and proc.poll() is None, "the fifth trial did not start"
        time.sleep(0.2)
    kill(proc, signal.SIGKILL)
    time.sleep(2.5)
    resumed = bench([*args, "--trials", "5", "--heartbeat", "0.5"], tmp_path / "cache", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    states = pd.read_csv(folder / "trials.csv")["state"].tolist()
    assert states.count("FAIL") == 1 and sum(s in ("COMPLETE", "PRUNED") for s in states) == 5


def test_a_pruned_trial_records_its_run_as_pruned_not_failed(tmp_path, monkeypatch):
    """What `bench tune`'s objective does at a validation the pruner rejects: the run stops at that
    step and its record says PRUNED, with no failure trace, so no browse of the runs shows failures."""
    from bench.config import resolve
    from bench.method.base import get_method
    from bench.run.runner import execute
    from bench.study.tune import Pruned
    monkeypatch.setenv("SSVIT_CACHE", str(tmp_path / "cache"))
    cfg = resolve(get_method("supervised"), preset="smoke", cli={
        "steps": 40, "eval_every": 10, "results_dir": str(tmp_path / "r"), "progress": False})
    seen = []

    def prune(step, val):
        seen.append(step)
        if step == 20:
            raise Pruned(f"pruned at step {step}")

    with pytest.raises(optuna.TrialPruned):
        execute(cfg, on_validation=prune, log=lambda *a: None)
    assert seen == [10, 20]
    (run,) = run_dirs(tmp_path / "r")
    record = load_json(run / "run.json")
    assert record["status"] == "PRUNED" and not record.get("fail_trace"), record.get("fail_trace")
    info = load_json(run / "info.json")
    assert "failure" not in info and info["stopped"] == "Pruned: pruned at step 20", info
