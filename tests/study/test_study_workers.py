"""Concurrent study workers on the journal and on PostgreSQL never duplicate a cell, a killed
worker's cell is retried, workers released together on a fresh database all join, and no
password reaches an output or a record."""
import signal
import subprocess
import sys
import time
import uuid

import pandas as pd
from optuna.trial import TrialState

from helpers import REPO, bench, kill, run_dirs, start_bench
from grids import FAST, completed_per_cell, completed_runs, trials, write_study


def _concurrent(tmp_path, storage, workers=3, kill_one=False):
    study, results = write_study(tmp_path, seeds=1), tmp_path / "results"
    args = ["study", str(study), "--dataset", "synthetic", *FAST, "--results-dir", str(results),
            # a beat short enough to notice a killed worker within seconds, yet a worker starved
            # by a loaded machine for a few seconds must not look dead (grace = 4 beats)
            "--heartbeat", "1.5" if kill_one else "5", *(["--storage", storage] if storage else [])]
    bench(["run", "supervised", "--preset", "smoke", "--steps", "1", "--results-dir", str(tmp_path / "warm"),
           "--no-progress"], tmp_path / "cache")  # decode the data once, before the race
    procs = [start_bench(args, tmp_path / "cache") for _ in range(workers)]
    if kill_one:
        deadline = time.time() + 300
        while not any((r / "checkpoint.pt").exists() for r in run_dirs(results)):
            assert time.time() < deadline
            time.sleep(0.1)
        kill(procs[0], signal.SIGKILL)
    for p in procs[kill_one:]:
        p.wait(timeout=900)
        assert p.returncode == 0, p.stderr.read()[-3000:]
    ts = trials(storage or results / "studies" / "optuna.journal", "tiny:synthetic:smoke")
    assert sorted(completed_per_cell(ts).values()) == [1] * 4   # every cell exactly once
    # a withdrawn or lost claim never looks like a result on a dashboard (test_claims shows both)
    assert all(t.value is None for t in ts if t.state != TrialState.COMPLETE)
    return ts, results


def test_concurrent_workers_on_the_journal_run_each_cell_once(tmp_path):
    _, results = _concurrent(tmp_path, None)
    assert len(completed_runs(results)) == 4


def test_concurrent_workers_on_postgresql_run_each_cell_once(tmp_path, postgres):
    _, results = _concurrent(tmp_path, postgres)
    assert len(completed_runs(results)) == 4


def test_killed_worker_on_postgresql_has_its_cell_retried(tmp_path, postgres):
    ts, results = _concurrent(tmp_path, postgres, workers=2, kill_one=True)
    summary = pd.read_csv(results / "reports" / "tiny" / "synthetic-smoke" / "summary.csv")
    assert (summary["n"] == 1).all()  # no cell counted twice


def test_no_password_is_ever_printed_or_recorded(tmp_path, postgres):
    secret = "s3cr3t-pw"
    url = postgres.replace("postgres@", f"postgres:{secret}@")  # trust auth: the password is not checked
    results = tmp_path / "results"
    out = bench(["tune", "supervised", "--preset", "smoke", "--trials", "1", "--storage", url, "--set", "steps=10",
                 "--set", "eval_every=10", "--results-dir", str(results), "--no-progress"],
                tmp_path / "cache", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert secret not in out.stdout + out.stderr and "postgres:***@" in out.stdout
    for path in results.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".txt", ".yaml", ".csv"):
            assert secret not in path.read_text(errors="ignore"), path


JOIN = """
import sys, time
from pathlib import Path
from bench.study.storage import open_storage          # imports done before the start signal
import optuna
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
storage = open_storage(sys.argv[1])
optuna.create_study(study_name="race", storage=storage, load_if_exists=True)
print("joined")
"""


def test_workers_released_together_on_a_fresh_database_all_join(tmp_path, postgres):
    """Optuna's own RDBStorage races to create its schema (IntegrityError on pg_type); the
    suite creates it once under a database lock, so every worker joins, every time."""
    import psycopg
    base, workers = postgres.rsplit("/", 1)[0], 8
    admin = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True)
    for round_ in range(3):
        name = f"ssvit_race_{uuid.uuid4().hex[:10]}"
        admin.execute(f"CREATE DATABASE {name}")
        try:
            go = tmp_path / f"go{round_}"
            procs = [subprocess.Popen([sys.executable, "-c", JOIN, f"{base}/{name}", str(go)], cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(workers)]
            time.sleep(8)  # every worker has imported and waits for the start
            go.touch()
            outs = [p.communicate(timeout=120) for p in procs]
            failed = [err[-600:] for p, (out, err) in zip(procs, outs) if p.returncode != 0 or "joined" not in out]
            assert not failed, f"round {round_}: {len(failed)} of {workers} workers failed: {failed[0]}"
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()
