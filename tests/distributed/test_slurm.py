"""Studies on a real one-node SLURM (`.ci/slurm-up` starts munge, slurmctld and slurmd): the
workers run as SLURM jobs through submitit, and a preempted job is requeued and resumes its
cell from the run's checkpoint."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from helpers import REPO, bench_env, load_json, run_dirs, wait_for

REQUIRED = os.environ.get("SSVIT_REQUIRE_SLURM") == "1"  # CI: a missing cluster fails, it does not skip


def slurm_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [pytest.mark.skipif(not REQUIRED and not slurm_up(), reason="no SLURM cluster here"),
              pytest.mark.skipif(not REQUIRED and importlib.util.find_spec("submitit") is None, reason="no submitit")]
FAST = ["--preset", "smoke", "--no-progress", "--set", "eval_every=10", "--set", "log_every=5"]


def study_file(tmp_path, lrs, seeds=1):
    path = tmp_path / "slurm.yaml"
    path.write_text(f"methods: [supervised]\naxes: {{lr: {{values: {list(lrs)}}}}}\nseeds: {seeds}\n")
    return path


def env(tmp_path):
    e = {**bench_env(tmp_path / "cache"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return e


def test_study_workers_run_as_slurm_jobs(tmp_path):
    assert slurm_up(), "the one-node SLURM is not running: run .ci/slurm-up"
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "bench.cli", "study", str(study_file(tmp_path, [0.002, 0.004])),
                           "--dataset", "synthetic", *FAST, "--set", "steps=20", "--results-dir", str(results),
                           "--launcher", "slurm", "--workers", "2", "--slurm", "time=10"],
                          cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert re.search(r"2 SLURM job\(s\) \d+, \d+", done.stdout), done.stdout
    assert "2/2 cells done" in done.stdout
    runs = run_dirs(results)
    assert len(runs) == 2 and all(load_json(r / "run.json")["status"] == "COMPLETED" for r in runs)
    assert (results / "reports" / "slurm" / "synthetic-smoke" / "table.md").exists()


def job_state(job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout


def diagnosis(job: str, folder) -> str:
    """What a failure message shows: the job and the node as SLURM sees them, and the job's log."""
    logs = "".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(folder.glob("*.err")))
    node = subprocess.run(["sinfo", "-N", "-o", "%N %T %E"], capture_output=True, text=True).stdout
    return f"{job_state(job)}\n{node}\n{logs}"


def release_when_requeued(job: str, folder, timeout: float = 300) -> None:
    """SLURM holds a requeued batch job back for a couple of minutes before it is eligible again;
    once it is pending, let it start now (the requeue itself is SLURM's, untouched)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        shown = job_state(job)
        if re.search(r"Restarts=[1-9]", shown) and "JobState=PENDING" in shown:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
            return
        if "JobState=RUNNING" in shown and re.search(r"Restarts=[1-9]", shown):
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} was not requeued within {timeout:.0f} s\n{diagnosis(job, folder)}")


def test_a_preempted_worker_job_is_requeued_and_resumes_its_cell(tmp_path):
    assert slurm_up(), "the one-node SLURM is not running: run .ci/slurm-up"
    results = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "study", str(study_file(tmp_path, [0.002])),
                             "--dataset", "synthetic", *FAST, "--set", "steps=400", "--set", "ckpt_every=20",
                             "--results-dir", str(results), "--launcher", "slurm", "--workers", "1",
                             "--heartbeat", "2", "--slurm", "time=20"],
                            cwd=REPO, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    while not (job := re.search(r"job\(s\) (\d+)", seen)) and proc.poll() is None:  # after the plan
        seen += proc.stdout.readline()
    assert job, seen + proc.stderr.read()[-2000:]
    job, folder = job.group(1), results / "slurm"
    ckpt = results / "runs" / "1" / "checkpoint.pt"
    try:
        wait_for(ckpt, proc, timeout=300)
        # what submitit's own preemption test does: SIGTERM to the job's processes, then its signal
        subprocess.run(["scancel", job, "--signal", "SIGTERM"], check=True)
        time.sleep(1)
        subprocess.run(["scancel", job, "--signal", "USR2"], check=True)
        release_when_requeued(job, folder)
        out, err = proc.communicate(timeout=900)
    except (AssertionError, subprocess.TimeoutExpired) as e:
        proc.kill()
        subprocess.run(["scancel", job], capture_output=True)
        raise AssertionError(f"{str(e)[:300]}\n{diagnosis(job, folder)}") from None
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "1/1 cells done" in out
    assert re.search(r"Restarts=[1-9]", job_state(job)), job_state(job)  # SLURM requeued the job
    # the first incarnation's worker stopped by itself (cells checkpointed, report written), not killed
    log = (folder / f"{job}_0_log.err").read_text()
    assert "interrupted: study slurm:synthetic:smoke stopped with 0/1 cells done" in log, log[-3000:]
    (run,) = run_dirs(results)                                   # one run, resumed in place
    assert load_json(run / "run.json")["status"] == "COMPLETED"
    assert load_json(run / "info.json")["resumed_from_step"] > 0


def test_node_lists_expand_as_scontrol_expands_them():
    from bench.distributed.world import expand_hostlist
    for nodelist in ("rack[1-2]-node[01-04]", "gpu[03-05,07],cpu1", "a-b[8-11]"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        assert expand_hostlist(nodelist) == out.stdout.split(), nodelist
