"""Faults: a non-finite loss keeps the last good checkpoint, atomic writes survive a crash
mid-write, a results directory that turns read-only or full mid-run stops the run with its
checkpoint intact, an unreachable observer is reported before anything is written."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.train import checkpoint
from bench.config import resolve
from bench.data.sources import make_synthetic
from bench.train.trainer import Trainer
from bench.errors import NonFiniteLoss
from bench.io import atomic_write, atomic_write_text
from bench.method.base import get_method
from bench.data.splits import make_split
from helpers import REPO, bench, bench_env, load_json


# A private mount namespace lets the test turn the results directory read-only (or full) under a
# running `bench run`, for real and even as root, without touching the rest of the machine.
UNWRITABLE = {
    "read-only": ("mount --bind \"$R\" \"$R\"", "mount -o remount,bind,ro \"$R\""),
    "disk full": ("mount -t tmpfs -o size=24m tmpfs \"$R\"",
                  "dd if=/dev/zero of=\"$R/filler\" bs=1M 2>/dev/null || true"),
}
STEPS = 100
# The run is paused (SIGSTOP) from its first checkpoint until the fault is in place, so the
# fault lands mid-run however loaded the machine is: no race against the clock.
SCRIPT = """
set -u
{mount}
"$PY" -m bench.cli run supervised --preset smoke --steps {steps} --ckpt-every 20 --eval-every 20 \\
    --no-progress --results-dir "$R" > "$OUT/stdout" 2> "$OUT/stderr" &
pid=$!
while [ ! -f "$R/runs/1/checkpoint.pt" ]; do kill -0 $pid 2>/dev/null || break; sleep 0.05; done
kill -STOP $pid
{break_it}
kill -CONT $pid
wait $pid
echo $? > "$OUT/rc"
rm -f "$R/filler"
cp -a "$R/." "$OUT/results/"
"""


def in_mount_namespace(tmp_path, script: str) -> Path:
    """Run `script` in a private mount namespace with $R (the results directory), $OUT and $PY."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and util-linux unshare for a private mount namespace")
    results, out = tmp_path / "r", tmp_path / "out"
    results.mkdir()
    (out / "results").mkdir(parents=True)
    env = {**bench_env(tmp_path / "cache"), "R": str(results), "OUT": str(out), "PY": sys.executable}
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def test_a_full_results_disk_is_bad_input_before_the_run_starts(tmp_path):
    out = in_mount_namespace(tmp_path, """
mount -t tmpfs -o size=1m tmpfs "$R"
dd if=/dev/zero of="$R/filler" bs=64k 2>/dev/null || true
"$PY" -m bench.cli run supervised --preset smoke --no-progress --results-dir "$R" > "$OUT/stdout" 2> "$OUT/stderr"
echo $? > "$OUT/rc"
rm -f "$R/filler"
cp -a "$R/." "$OUT/results/"
""")
    stderr = (out / "stderr").read_text().strip().splitlines()
    assert (out / "rc").read_text().strip() == "2" and len(stderr) == 1, stderr
    assert "is not writable (No space left on device)" in stderr[0]
    assert not any((out / "results").rglob("*"))  # nothing half-written


@pytest.mark.parametrize("fault", UNWRITABLE)
def test_results_directory_turning_unwritable_mid_run_keeps_its_checkpoint(tmp_path, fault):
    mount, break_it = UNWRITABLE[fault]
    out = in_mount_namespace(tmp_path, SCRIPT.format(mount=mount, break_it=break_it, steps=STEPS))
    stderr = (out / "stderr").read_text().strip().splitlines()
    assert (out / "rc").read_text().strip() == "1", stderr
    assert len(stderr) == 1 and "Traceback" not in stderr[0], stderr  # one line, no traceback storm
    reason = "Read-only file system" if fault == "read-only" else "No space left on device"
    assert stderr[0].startswith("error: run 1 stopped: cannot write to") and reason in stderr[0]

    run = out / "results" / "runs" / "1"
    kept = checkpoint.load(run / "checkpoint.pt")  # intact and loadable, never half-written
    assert 20 <= kept["step"] < STEPS and kept["step"] % 20 == 0
    assert f"its checkpoint at step {kept['step']} is kept; continue with `--resume 1`" in stderr[0]
    assert not list(run.glob(".*.tmp"))  # no temporary left behind

    resumed = bench(["run", "supervised", "--preset", "smoke", "--steps", str(STEPS), "--ckpt-every", "20",
                     "--eval-every", "20", "--no-progress", "--results-dir", str(out / "results"),
                     "--resume", "1"], tmp_path / "cache", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert load_json(run / "run.json")["status"] == "COMPLETED"
    assert load_json(run / "info.json")["resumed_from_step"] == kept["step"]


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    data = make_synthetic(4, 16, 20, 5)
    cfg = resolve(get_method("supervised"), preset="smoke", cli={"img_size": 16, "patch_size": 4,
                                                               "steps": 40, "ckpt_every": 10, "progress": False})
    t = Trainer(cfg, get_method("supervised"), data, make_split(data.train_y, 4, label_fraction=0.5, seed=0), tmp_path)
    cfg["steps"] = 10
    t.run(progress=False)
    good = checkpoint.load(t.ckpt_path)
    assert good["step"] == 10
    cfg["steps"], cfg["lr"], cfg["warmup_steps"] = 40, 1e30, 0  # the run diverges from here
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):
        t.run(progress=False)
    kept = checkpoint.load(t.ckpt_path)
    assert kept["step"] == 10  # the diverged state never replaced the good checkpoint
    assert all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_a_crash_mid_write_leaves_the_previous_version(tmp_path):
    target = tmp_path / "table.csv"
    atomic_write_text(target, "old,complete\n")

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write("new,half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_text() == "old,complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]  # no temporary left behind


def test_unreachable_mongo_is_reported_before_anything_is_written(tmp_path):
    out = bench(["run", "supervised", "--preset", "smoke", "--mongo", "mongodb://127.0.0.1:1/x",
                 "--results-dir", str(tmp_path / "r")], tmp_path / "c")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach MongoDB at mongodb://127.0.0.1:1/x" in lines[0], out.stderr
    assert not (tmp_path / "r").exists()
