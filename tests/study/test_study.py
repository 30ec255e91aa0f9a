"""Studies end to end: the grid runs once per cell, reruns skip finished cells, interrupted and
killed workers are retried, a failing cell is recorded and skipped, and the report equals a hand
computation."""
import signal
import statistics
import time

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from helpers import assert_rejected, bench, kill, load_json, run_cli, run_dirs
from grids import (FAST, completed_per_cell, completed_runs, running_with_checkpoint, start_study_until, trials,
                   write_study)


def test_study_runs_every_cell_once_and_reports_what_the_runs_hold(tmp_path):
    study, results = write_study(tmp_path), tmp_path / "results"
    args = ["study", str(study), "--dataset", "synthetic", *FAST, "--results-dir", str(results), "--workers", "2"]
    out = bench(args, tmp_path / "cache", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = run_dirs(results)
    assert len(runs) == 8 and len(completed_runs(results)) == 8
    ts = trials(results / "studies" / "optuna.journal", "tiny:synthetic:smoke")
    assert sorted(completed_per_cell(ts).values()) == [1] * 8
    # (two workers colliding on a cell: test_claims)
    # one seed at a time: no cell of seed 1 is claimed while one of seed 0 waits for a worker
    numbers = {0: [], 1: []}
    for t in ts:
        if t.state == TrialState.COMPLETE:
            numbers[t.params["seed"]].append(t.number)
    assert max(numbers[0]) < min(numbers[1]), numbers
    for t in (t for t in ts if not t.user_attrs.get("withdrawn")):  # trial and run are cross-linked both ways
        info = load_json(results / "runs" / t.user_attrs["run_id"] / "info.json")
        assert info["optuna"]["trial"] == t.number and info["optuna"]["cell"] == t.user_attrs["cell"]
        # the cell is a set of real Optuna parameters, so optuna-dashboard's plots read the grid
        cfg = load_json(results / "runs" / t.user_attrs["run_id"] / "config.json")
        assert t.params == {"method": "supervised", "label_fraction": cfg["label_fraction"], "lr": cfg["lr"],
                            "seed": cfg["seed"]}
        assert t.distributions["lr"].choices == (0.002, 0.004) and t.distributions["seed"].high == 1
    frame = optuna.load_study(study_name="tiny:synthetic:smoke",
                              storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
                                  str(results / "studies" / "optuna.journal")))).trials_dataframe()
    frame = frame[frame["state"] == "COMPLETE"]
    assert len(frame) == 8
    for column in ("params_method", "params_label_fraction", "params_lr", "params_seed", "value"):
        assert frame[column].notna().all(), column

    # the report's numbers equal a hand computation from the stored runs
    groups = {}
    for r in runs:
        cfg, res = load_json(r / "config.json"), load_json(r / "run.json")["result"]
        groups.setdefault((cfg["label_fraction"], cfg["lr"]), []).append(res["test_acc_ema"])
    report = results / "reports" / "tiny" / "synthetic-smoke"
    summary = pd.read_csv(report / "summary.csv")
    assert len(summary) == 4
    for _, row in summary.iterrows():
        values = groups[(row["label_fraction"], row["lr"])]
        assert row["n"] == 2
        assert row["mean"] == pytest.approx(statistics.mean(values))
        assert row["std"] == pytest.approx(statistics.stdev(values))
    for name in ("table.csv", "table.md", "table.tex", "figure.png", "figure.pdf", "curves.png"):
        assert (report / name).stat().st_size > 0, name
    assert f"{statistics.mean(groups[(0.2, 0.002)]):.2f}" in (report / "table.md").read_text()
    tex = (report / "table.tex").read_text()
    assert r"\toprule" in tex and r"\usepackage{booktabs}" in tex.splitlines()[0]  # the package it needs, named
    # each run's provenance travels into runs.csv
    runs_csv = pd.read_csv(report / "runs.csv")
    record = load_json(runs[0] / "run.json")
    assert set(runs_csv["commit"]) == {record["experiment"]["repositories"][0]["commit"]}
    assert set(runs_csv["version.torch"]) == {torch.__version__.split("+")[0]} \
        and set(runs_csv["device"]) == {f"CPU ({record['host']['cpu']}, {torch.backends.cpu.get_cpu_capability()})"}

    # a rerun skips finished cells; `bench report` rebuilds the same numbers from the stores
    (report / "summary.csv").unlink()
    again = bench(args, tmp_path / "cache", timeout=300)
    assert again.returncode == 0 and len(run_dirs(results)) == 8
    rebuilt = bench(["report", str(study), "--results-dir", str(results)], tmp_path / "cache")
    assert rebuilt.returncode == 0, rebuilt.stderr
    pd.testing.assert_frame_equal(pd.read_csv(report / "summary.csv"), summary)


def test_a_study_cut_on_the_command_line_runs_the_same_cells_a_full_run_reuses(tmp_path):
    study, results = tmp_path / "two.yaml", tmp_path / "results"
    study.write_text("methods: [supervised, fixmatch]\naxes: {lr: {values: [0.002, 0.004]}}\nseeds: 1\n")
    base = ["study", str(study), "--dataset", "synthetic", *FAST, "--results-dir", str(results)]
    cut = bench([*base, "--methods", "fixmatch", "--values", "lr=0.004,0.003"], tmp_path / "cache", timeout=600)
    assert cut.returncode == 0, cut.stderr[-3000:]
    ran = {(load_json(r / "config.json")["method"], load_json(r / "config.json")["lr"]) for r in run_dirs(results)}
    assert ran == {("fixmatch", 0.004), ("fixmatch", 0.003)}       # 0.003 is a new cell of the axis
    summary = pd.read_csv(results / "reports" / "two" / "synthetic-smoke" / "summary.csv")
    assert {(m, lr) for m, lr, n in zip(summary["method"], summary["lr"], summary["n"]) if n} == \
        {("fixmatch", 0.004), ("fixmatch", 0.003)}
    assert set(summary["method"]) == {"supervised", "fixmatch"} and set(summary["lr"]) == {0.002, 0.003, 0.004}
    # another cut into the same report: the first cut's rows stay in it
    other = bench([*base, "--methods", "supervised", "--values", "lr=0.002"], tmp_path / "cache", timeout=600)
    assert other.returncode == 0, other.stderr[-3000:]
    summary = pd.read_csv(results / "reports" / "two" / "synthetic-smoke" / "summary.csv")
    assert {(m, lr) for m, lr, n in zip(summary["method"], summary["lr"], summary["n"]) if n} == \
        {("fixmatch", 0.004), ("fixmatch", 0.003), ("supervised", 0.002)}
    full = bench(base, tmp_path / "cache", timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    runs = [(load_json(r / "config.json")["method"], load_json(r / "config.json")["lr"]) for r in run_dirs(results)]
    assert len(runs) == 5 and runs.count(("fixmatch", 0.004)) == 1  # the cut's cell was reused, not rerun


def test_a_published_study_rebuilds_and_resumes_from_its_run_records_alone(tmp_path):
    """The report folder is all another machine needs: its run records rebuild the report and
    count as finished cells, while a record whose config no longer matches runs again."""
    study, published = tmp_path / "one.yaml", tmp_path / "published"
    study.write_text("methods: [supervised]\naxes: {lr: {values: [0.002, 0.004]}}\nseeds: 1\n")
    base = ["study", str(study), "--dataset", "synthetic", *FAST, "--report-dir", str(published)]
    first = bench([*base, "--results-dir", str(tmp_path / "a")], tmp_path / "cache", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = published / "one" / "synthetic-smoke"
    records = sorted((folder / "runs").glob("*.json"))
    assert [r.name for r in records] == ["supervised+lr=0.002+seed=0.json", "supervised+lr=0.004+seed=0.json"]
    summary = pd.read_csv(folder / "summary.csv")
    runs_csv = pd.read_csv(folder / "runs.csv")

    # a fresh clone: no stores, only the folder; the report rebuilds to the same numbers and curves
    figures = {name: (folder / name).read_bytes() for name in ("figure.pdf", "curves.pdf", "figure.png")}
    for name in ("summary.csv", "runs.csv", "curves.png"):
        (folder / name).unlink()
    rebuilt = bench(["report", str(study), "--results-dir", str(tmp_path / "b"), "--report-dir", str(published)],
                    tmp_path / "cache")
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_csv(folder / "summary.csv"), summary)
    again = pd.read_csv(folder / "runs.csv")
    for column in ("test_acc", "pl_rate", "val_images", "commit", "steps", "seed", "lr"):
        pd.testing.assert_series_equal(again[column], runs_csv[column])
    assert (folder / "curves.png").stat().st_size > 0
    assert {name: (folder / name).read_bytes() for name in figures} == figures   # the same bytes, PDFs too
    assert [r.read_text() for r in records] == [r.read_text() for r in sorted((folder / "runs").glob("*.json"))]

    # a study on yet another machine runs only the cell the records lack
    grown = bench([*base, "--results-dir", str(tmp_path / "c"), "--values", "lr=0.002,0.003"], tmp_path / "cache",
                  timeout=600)
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert "1 finished cell(s) restored" in grown.stdout
    assert [load_json(r / "config.json")["lr"] for r in run_dirs(tmp_path / "c")] == [0.003]
    grown_summary = pd.read_csv(folder / "summary.csv").set_index("lr")
    assert sorted(grown_summary.index) == [0.002, 0.003, 0.004]   # the cut's report keeps the other records
    for lr in (0.002, 0.004):
        assert grown_summary.loc[lr, "mean"] == summary.set_index("lr").loc[lr, "mean"]
    # `bench report` on a fresh clone keeps the value the cut added, read from its record
    (folder / "summary.csv").unlink()
    reported = bench(["report", str(study), "--results-dir", str(tmp_path / "b2"), "--report-dir", str(published)],
                     tmp_path / "cache")
    assert reported.returncode == 0, reported.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_csv(folder / "summary.csv").set_index("lr"), grown_summary)

    # another study whose cell is the same run (same config) takes that run's record, not a rerun
    other = tmp_path / "other.yaml"
    other.write_text("methods: [supervised]\nfixed: {lr: 0.004}\nseeds: 1\n")
    shared = bench(["study", str(other), "--dataset", "synthetic", *FAST, "--report-dir", str(published),
                    "--results-dir", str(tmp_path / "c")], tmp_path / "cache", timeout=600)
    assert shared.returncode == 0, shared.stderr[-3000:]
    assert "one/synthetic-smoke held the same runs" in shared.stdout and len(run_dirs(tmp_path / "c")) == 1
    assert pd.read_csv(published / "other" / "synthetic-smoke" / "summary.csv")["mean"].tolist() == \
        [summary.set_index("lr").loc[0.004, "mean"]]

    # `bench report` too shows, for a cell its folder lacks, the same run (at the preset) from another folder
    plain, same = tmp_path / "plain.yaml", tmp_path / "same.yaml"
    plain.write_text("methods: [supervised]\nseeds: 1\n")
    same.write_text("methods: [supervised]\nfixed: {lr: 0.002}\nseeds: 1\n")  # smoke's own lr: one run
    ran = bench(["study", str(plain), "--dataset", "synthetic", "--preset", "smoke", "--no-progress",
                 "--report-dir", str(published), "--results-dir", str(tmp_path / "p")], tmp_path / "cache", timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    shown = bench(["report", str(same), "--dataset", "synthetic", "--preset", "smoke", "--report-dir", str(published),
                   "--results-dir", str(tmp_path / "q")], tmp_path / "cache")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert pd.read_csv(published / "same" / "synthetic-smoke" / "summary.csv")["mean"].tolist() == \
        pd.read_csv(published / "plain" / "synthetic-smoke" / "summary.csv")["mean"].tolist()

    # a changed recipe makes a record stale: it is named, and its cell runs again
    changed = bench([*base[:-2], "--set", "steps=30", "--report-dir", str(published), "--results-dir",
                     str(tmp_path / "d"), "--values", "lr=0.002"], tmp_path / "cache", timeout=600)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "supervised|lr=0.002|seed=0 (steps=20, now 30)" in changed.stdout
    assert [load_json(r / "config.json")["steps"] for r in run_dirs(tmp_path / "d")] == [30]
    assert load_json(folder / "runs" / "supervised+lr=0.002+seed=0.json")["files"]["config.json"]["steps"] == 30

    # a damaged record stops the report in one line that names it
    records[1].write_text("{not json")
    bad = bench(["report", str(study), "--results-dir", str(tmp_path / "e"), "--report-dir", str(published)],
                tmp_path / "cache")
    assert bad.returncode == 2 and records[1].name in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_two_cells_that_are_one_run_train_once(tmp_path):
    """The fully supervised reference trains on every label, so its cells at several labels-per-class
    values are one run: in one invocation the second cell waits for the first and takes its run; a
    later cut takes the recorded run (and its plan counts it done)."""
    study, published = tmp_path / "dup.yaml", tmp_path / "published"
    study.write_text("methods: [supervised]\naxes: {labels_per_class: {values: [2, 3, 4]}}\n"
                     "references: [fully_supervised]\nseeds: 1\n")
    base = ["study", str(study), "--dataset", "synthetic", *FAST, "--report-dir", str(published),
            "--results-dir", str(tmp_path / "r"), "--variants", "fully_supervised"]
    first = bench([*base, "--values", "labels_per_class=2,3"], tmp_path / "cache", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(run_dirs(tmp_path / "r")) == 1, first.stdout   # one training for the two cells
    assert "labels_per_class=3|variant=fully_supervised|seed=0 is the same run as" in first.stdout, first.stdout
    assert "2/2 cells done" in first.stdout, first.stdout
    second = bench([*base, "--values", "labels_per_class=4"], tmp_path / "cache", timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "recorded: 1 of 1 cells already finished" in second.stdout, second.stdout   # its plan counts it done
    assert len(run_dirs(tmp_path / "r")) == 1 and "dup/synthetic-smoke held the same runs" in second.stdout
    folder = published / "dup" / "synthetic-smoke"
    three = {r.name: load_json(r)["value"] for r in (folder / "runs").glob("*.json")}
    assert sorted(three) == [f"supervised+labels_per_class={n}+variant=fully_supervised+seed=0.json" for n in (2, 3, 4)]
    assert len(set(three.values())) == 1
    # a cell whose config differs is not taken from it: the main cells still count as to run
    plan = bench([*base[:-1], "main", "fully_supervised", "--plan"], tmp_path / "cache")
    assert plan.returncode == 0 and "recorded: 3 of 6 cells already finished" in plan.stdout, plan.stdout


def test_failed_cell_is_recorded_and_the_study_goes_on(tmp_path):
    study, results = write_study(tmp_path, seeds=1, lrs=(0.002, 1e30)), tmp_path / "results"
    out = bench(["study", str(study), "--dataset", "synthetic", *FAST, "--results-dir", str(results)],
                tmp_path / "cache", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ts = trials(results / "studies" / "optuna.journal", "tiny:synthetic:smoke")
    failed = [t for t in ts if t.state == TrialState.FAIL]
    assert len(failed) == 2 and all("non-finite loss" in t.user_attrs["reason"] for t in failed)
    assert len(completed_per_cell(ts)) == 2
    for t in failed:  # the failed run keeps its status, reason and earlier checkpoints
        run = results / "runs" / t.user_attrs["run_id"]
        assert load_json(run / "run.json")["status"] == "FAILED"
        assert "NonFiniteLoss" in load_json(run / "info.json")["failure"]
    summary = pd.read_csv(results / "reports" / "tiny" / "synthetic-smoke" / "summary.csv")
    broken = summary[summary["lr"] == 1e30]
    assert (broken["n"] == 0).all() and broken["mean"].isna().all()  # missing, never zero
    table = (results / "reports" / "tiny" / "synthetic-smoke" / "table.md").read_text()
    assert "—" in table
    # one seed has no spread to report: std is empty, not 0.0
    single = summary[summary["n"] == 1]
    assert len(single) == 2 and single["std"].isna().all()
    assert "± 0.00" not in table and "(1)" in table


def test_killed_study_resumes_only_missing_cells(tmp_path):
    study, results = write_study(tmp_path, seeds=1), tmp_path / "results"
    args = ["study", str(study), "--dataset", "synthetic", *FAST, "--set", "steps=200",
            "--results-dir", str(results), "--heartbeat", "0.5"]
    proc = start_study_until(args, tmp_path, lambda: completed_runs(results) and running_with_checkpoint(results))
    (victim,) = running_with_checkpoint(results)
    journal, deadline = results / "studies" / "optuna.journal", time.time() + 300
    while not any(t.user_attrs.get("run_id") == victim.name for t in trials(journal, "tiny:synthetic:smoke")):
        assert time.time() < deadline, "the worker never linked its trial to the running run"
        time.sleep(0.1)  # the worker links its trial to the run on its next heartbeat
    kill(proc, signal.SIGKILL)  # the worker and (with it) its running trial die
    before = {r.name for r in completed_runs(results)}
    time.sleep(2.5)  # past the heartbeat grace: the dead trial is stale
    out = bench(args, tmp_path / "cache", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ts = trials(results / "studies" / "optuna.journal", "tiny:synthetic:smoke")
    assert sorted(completed_per_cell(ts).values()) == [1] * 4
    after = completed_runs(results)
    assert len(after) == 4 and before <= {r.name for r in after}  # finished cells were not rerun
    lost = [t for t in ts if t.state == TrialState.FAIL]
    assert lost and all("worker lost" in t.user_attrs["reason"] for t in lost)
    assert victim in after and "resumed_from_step" in load_json(victim / "info.json"), \
        "the interrupted cell continued from its checkpoint, in its own run directory"


def test_ctrl_c_stops_a_study_cleanly_and_a_rerun_resumes_it(tmp_path):
    study, results = write_study(tmp_path, seeds=1), tmp_path / "results"
    args = ["study", str(study), "--dataset", "synthetic", *FAST, "--set", "steps=200",
            "--results-dir", str(results), "--heartbeat", "0.5"]
    proc = start_study_until(args, tmp_path, lambda: (results / "runs" / "1" / "checkpoint.pt").exists())
    kill(proc, signal.SIGINT)  # what Ctrl-C sends to the study's foreground process
    stderr = [line for line in proc.stderr.read().splitlines() if line.strip()]
    assert proc.returncode == 130
    assert len(stderr) == 1, stderr  # one line, no traceback
    assert stderr[0].startswith("interrupted: study tiny:synthetic:smoke stopped with 0/4 cells done")
    assert "rerun the same command to continue" in stderr[0]
    (run,) = run_dirs(results)  # the running cell stopped at a step boundary and checkpointed
    assert load_json(run / "run.json")["status"] == "INTERRUPTED"
    step = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["step"]
    assert 0 < step < 200
    (t,) = trials(results / "studies" / "optuna.journal", "tiny:synthetic:smoke")
    assert t.state == TrialState.FAIL and t.user_attrs["reason"].startswith("interrupted")
    assert (results / "reports" / "tiny" / "synthetic-smoke" / "table.md").exists()  # the report so far

    out = bench(args, tmp_path / "cache", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    ts = trials(results / "studies" / "optuna.journal", "tiny:synthetic:smoke")
    assert sorted(completed_per_cell(ts).values()) == [1] * 4
    assert len(run_dirs(results)) == 4 and len(completed_runs(results)) == 4  # resumed in place
    assert load_json(run / "info.json")["resumed_from_step"] == step


def test_study_bad_input(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [supervised]\naxes: {lr: {values: []}}\n")
    cases = [(["study", "nope", "--dataset", "synthetic"], "unknown study 'nope'"),
             (["study", str(bad), "--dataset", "synthetic"], "needs a non-empty 'values' list"),
             (["study", "mask_ratio", "--dataset", "mnist"], "unknown dataset 'mnist'"),
             (["study", "mask_ratio", "--dataset", "synthetic", "--workers", "0"], "--workers"),
             (["study", "mask_ratio", "--dataset", "synthetic", "--heartbeat", "inf"], "--heartbeat"),
             (["study", "mask_ratio", "--dataset", "synthetic", "--set", "lr=-1"], "lr"),
             (["study", "mask_ratio", "--dataset", "synthetic", "--methods", "nope"], "unknown method 'nope'"),
             (["study", "mask_ratio", "--dataset", "synthetic", "--values", "depth=2"], "has no axis 'depth'"),
             (["study", "mask_ratio", "--dataset", "synthetic", "--values", "mask_ratio"], "expected AXIS=V1,V2"),
             (["study", "mask_ratio", "--dataset", "synthetic", "--values", "mask_ratio=0.5,1.5"],
              "--mask-ratio: 1.5 is out of range"),
             (["report", "mask_ratio", "--results-dir", str(tmp_path / "empty")], "no study store")]
    for args, message in cases:
        args = [*args, "--results-dir", str(tmp_path / "r")] if args[0] == "study" else args
        code, lines, err = run_cli(args, tmp_path, capsys, monkeypatch)
        assert_rejected(code, lines, err, message, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_study_shows_the_running_cells_step_accuracy_and_eta(tmp_path):
    study = tmp_path / "one.yaml"
    study.write_text("methods: [supervised]\naxes: {lr: {values: [0.002]}}\nseeds: 1\n")
    out = bench(["study", str(study), "--dataset", "synthetic", "--preset", "smoke", "--set", "steps=300",
                 "--set", "log_every=5", "--set", "eval_every=100", "--results-dir", str(tmp_path / "r")],
                tmp_path / "cache", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    frames = out.stderr.replace("\r", "\n")
    shown = [line for line in frames.splitlines() if "supervised|lr=0.002|seed=0" in line and "/300" in line]
    assert shown and any("eta=" in line for line in shown), frames[-3000:]
    assert any("val=" in line for line in shown), frames[-3000:]
