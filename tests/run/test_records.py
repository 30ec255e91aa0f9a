"""What a run leaves for the tools researchers already use: a Sacred record that names the code
and hardware behind it, TensorBoard event files and a tidy curves.csv; and a CLI that tells the
truth about versions, resolved configs and defaults."""
import csv
import subprocess
import sys

import pytest

from bench.run.provenance import NOT_CODE
from helpers import REPO, bench, load_json, run_dirs


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    out = bench(["run", "ssmae", "--preset", "smoke", "--no-progress", "--results-dir", str(tmp / "r")], tmp / "cache")
    assert out.returncode == 0, out.stderr
    (run,) = run_dirs(tmp / "r")
    return run


def git(*args) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_the_record_names_versions_commit_and_device(smoke_run):
    from importlib.metadata import version
    record = load_json(smoke_run / "run.json")
    deps = dict(d.split("==") for d in record["experiment"]["dependencies"])
    for package in ("torch", "timm", "optuna", "sacred", "numpy", "ssvit-bench"):
        assert deps[package] == version(package), package
    (repo,) = record["experiment"]["repositories"]
    assert repo["commit"] == git("rev-parse", "HEAD")
    assert repo["dirty"] == bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", *NOT_CODE))
    assert record["experiment"]["mainfile"] == "bench/cli.py" and record["command"] == "bench_run"
    host = record["host"]
    assert host["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert host["accelerator"]["name"] == "CPU" and host["accelerator"]["type"] == "cpu"
    assert "cuda_version" in host["accelerator"] and "cudnn_version" in host["accelerator"]
    assert load_json(smoke_run / "info.json")["command"].startswith("bench run ssmae --preset smoke")


def test_a_checkout_is_modified_by_a_code_change_not_by_a_report_written_into_results(tmp_path):
    from bench.run.provenance import git_state
    checkout = tmp_path / "checkout"
    for path in ("bench/method.py", "results/published/study/table.csv"):
        (checkout / path).parent.mkdir(parents=True, exist_ok=True)
        (checkout / path).write_text("first\n")
    for args in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(checkout), *args], check=True)
    (checkout / "results/published/study/table.csv").write_text("a study's report\n")
    assert git_state(checkout)["dirty"] is False
    git_state.cache_clear()
    (checkout / "bench/method.py").write_text("changed\n")
    assert git_state(checkout)["dirty"] is True
    git_state.cache_clear()


def test_curves_csv_and_tensorboard_hold_every_logged_point(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    metrics = load_json(smoke_run / "metrics.json")
    expected = sorted((s, name, v) for name, series in metrics.items()
                      for s, v in zip(series["steps"], series["values"]))
    with open(smoke_run / "curves.csv") as f:
        rows = [(int(r["step"]), r["metric"], float(r["value"])) for r in csv.DictReader(f)]
    assert [r[:2] for r in rows] == [e[:2] for e in expected]
    assert [r[2] for r in rows] == pytest.approx([e[2] for e in expected])
    for name in ("val_acc_ema", "train.pl_rate", "train.pl_precision", "gate.open", "train.lr", "test_acc"):
        assert name in metrics, name
    events = EventAccumulator(str(smoke_run)).Reload()
    assert set(events.Tags()["scalars"]) == set(metrics)
    for name, series in metrics.items():
        points = events.Scalars(name)
        assert [p.step for p in points] == series["steps"], name
        assert [p.value for p in points] == pytest.approx(series["values"], rel=1e-6), name


def test_cli_prints_version_resolved_config_and_preset_defaults(tmp_path):
    version = bench(["--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("ssvit-bench 0.1.0 (git " + git("rev-parse", "HEAD")[:12])
    results = tmp_path / "r"
    shown = bench(["run", "fixmatch", "--preset", "smoke", "--set", "steps=70", "--lr", "0.01", "--print-config",
                   "--results-dir", str(results)], tmp_path / "cache")
    assert shown.returncode == 0 and not results.exists()
    lines = dict(line.split(": ", 1) for line in shown.stdout.splitlines() if not line.startswith("#"))
    assert lines["steps"] == "70  # command line" and lines["lr"] == "0.01  # command line"
    assert lines["depth"] == "2  # preset smoke" and lines["label_smoothing"] == "0.0  # fixmatch's recipe"
    assert lines["tau"] == "0.95  # default"
    # the printed config is a preset file that resolves to the same run
    (tmp_path / "same.yaml").write_text(shown.stdout)
    again = bench(["run", "fixmatch", "--preset", str(tmp_path / "same.yaml"), "--print-config"], tmp_path / "cache")
    assert [l.split("#")[0] for l in again.stdout.splitlines()[2:]] == [l.split("#")[0] for l in shown.stdout.splitlines()[2:]]
    help_text = " ".join(bench(["run", "supervised", "--preset", "smoke", "--help"], tmp_path).stdout.split())
    assert "(default: 60, preset smoke)" in help_text and "(default: 5000" not in help_text
    assert "(default: None)" not in help_text and help_text.count("~/.cache/ssvit-") == 1
    assert "runs/ (one Sacred run each), stages/" in help_text and "tables/" not in help_text
