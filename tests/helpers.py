"""Shared test helpers: run the real `bench` CLI in a subprocess, read its Sacred store, build smoke trainers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.config import resolve
from bench.train.sink import Sink
from bench.train.trainer import Trainer
from bench.method.base import get_method
from bench.data.splits import make_split

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10-images.tar.gz"
# the shared-start fixture's runs (conftest.py) and the tests that read them: one short smoke run
SHARED_START_ARGS = ["--preset", "smoke", "--no-progress", "--steps", "20", "--eval-every", "10", "--ckpt-every", "10",
                     "--log-every", "5", "--pretrain-steps", "10"]
# semi_vit's stage 2 at mae_finetune's recipe and length (the smoke preset's, shortened the same way)
SEMI_VIT_STAGE2_ARGS = ["--finetune-steps", "20"]


def bench_env(cache: Path) -> dict:
    env = dict(os.environ, SSVIT_CACHE=str(cache), PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def bench(args: list[str], cache: Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=cwd or REPO, env=bench_env(cache),
                          capture_output=True, text=True, timeout=timeout)


def start_bench(args: list[str], cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.cli", *args], cwd=REPO, env=bench_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before {path} appeared: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.05)


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    proc.send_signal(sig)
    proc.wait(timeout=60)


def run_dirs(results: Path) -> list[Path]:
    runs = results / "runs"
    return sorted((p for p in runs.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)) if runs.exists() else []


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def curves(run_dir: Path, skip=("train.img_per_s",)) -> dict:
    """metrics.json without wall-clock series (timestamps, throughput)."""
    metrics = load_json(run_dir / "metrics.json")
    return {k: (v["steps"], v["values"]) for k, v in metrics.items() if k not in skip and not k.endswith("img_per_s")}


def run_cli(args, tmp_path, capsys, monkeypatch, cache=True):
    """The real CLI entry point in this process: (exit code, non-empty stderr lines, stderr); with
    `cache`, $SSVIT_CACHE is a fresh folder under tmp_path."""
    from bench.cli import main
    if cache:
        monkeypatch.setenv("SSVIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    return code, lines, err


def assert_rejected(code, lines, err, words, results):
    """Bad input: exit 2, one line naming the problem, no traceback, nothing under `results`."""
    assert code == 2, err
    assert len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in err
    assert not results.exists() or not any(results.rglob("*")), "bad input wrote results"


class CallbackSink(Sink):
    """A training's curves and warnings handed to plain callables (a test's lists)."""

    def __init__(self, log=None, warn=None):
        self._log, self._warn = log, warn

    def log(self, name, value, step):
        if self._log is not None:
            self._log(name, value, step)

    def warn(self, message):
        if self._warn is not None:
            self._warn(message)


def smoke_trainer(method, data, run_dir, log=None, warn=None, split=None, **cli):
    """A Trainer for `method` at the smoke preset plus `cli` options, on a seeded 25 % label split
    (or `split`); its curves and warnings go to `log(name, value, step)` and `warn(message)`."""
    cfg = resolve(get_method(method), preset="smoke", cli={"progress": False, **cli})
    split = split or make_split(data.train_y, data.num_classes, label_fraction=0.25, seed=0)
    return Trainer(cfg, get_method(method), data, split, run_dir, sink=CallbackSink(log, warn))
