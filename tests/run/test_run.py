"""End-to-end `bench run`: Sacred store contents, resume equivalence, CLI errors."""
import re
import signal
import time

import pytest
import torch

from helpers import (SHARED_CIFAR10, assert_rejected, bench, curves, kill, load_json, run_cli, run_dirs,
                     start_bench, wait_for)

SMOKE = ["--dataset", "synthetic", "--preset", "smoke", "--no-progress"]


def test_supervised_smoke_run_is_recorded(tmp_path):
    results = tmp_path / "results"
    out = bench(["run", "supervised", *SMOKE, "--results-dir", str(results)], tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    assert "COMPLETED" in out.stdout
    (run,) = run_dirs(results)
    info, config, record = load_json(run / "info.json"), load_json(run / "config.json"), load_json(run / "run.json")
    assert record["status"] == "COMPLETED"
    assert config["method"] == "supervised" and config["preset"] == "smoke" and config["steps"] == 60
    split = load_json(run / "split.json")
    assert info["split_hash"] == split["hash"] == record["result"]["split_hash"]
    assert (run / "checkpoint.pt").exists() and info["checkpoint"].endswith("checkpoint.pt")
    metrics = load_json(run / "metrics.json")
    for name in ("train.loss", "train.loss_sup", "train.img_per_s", "val_acc", "val_acc_ema", "test_acc", "test_acc_ema"):
        assert metrics[name]["values"], name
    assert metrics["val_acc"]["steps"] == [20, 40, 60]
    result = record["result"]
    assert result["test_acc"] == metrics["test_acc"]["values"][-1]
    # selection reads validation only: the selected point is the best validation accuracy
    best_val = max(metrics["val_acc"]["values"] + metrics["val_acc_ema"]["values"])
    assert result["selected_val_acc"] == best_val
    # the loss falls and the model learns the synthetic classes well above chance (10 %)
    losses = metrics["train.loss"]["values"]
    assert losses[-1] < losses[0]
    assert max(result["test_acc"], result["test_acc_ema"]) > 30
    # progress-bar refreshes do not flood the captured output
    assert len((run / "cout.txt").read_text().splitlines()) < 20


def _checkpoint_model(run):
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)


def uninterrupted_then_started(args, tmp_path):
    """Run `args` to the end under a/, then start the same run under b/ and wait for its first
    checkpoint; returns (a's run dir, the running process, b's run dir)."""
    full = bench([*args, "--results-dir", str(tmp_path / "a")], tmp_path / "cache")
    assert full.returncode == 0, full.stderr
    (run_a,) = run_dirs(tmp_path / "a")
    proc = start_bench([*args, "--results-dir", str(tmp_path / "b")], tmp_path / "cache")
    run_b = tmp_path / "b" / "runs" / "1"
    wait_for(run_b / "checkpoint.pt", proc)
    return run_a, proc, run_b


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, sig):
    args = ["run", "supervised", *SMOKE, "--steps", "120", "--ckpt-every", "20", "--eval-every", "20"]
    cache = tmp_path / "cache"
    run_a, proc, _ = uninterrupted_then_started(args, tmp_path)
    kill(proc, sig)
    assert proc.returncode != 0
    (run_b,) = run_dirs(tmp_path / "b")
    if sig == signal.SIGINT:  # Ctrl-C: a clean stop and a one-line message
        assert load_json(run_b / "run.json")["status"] == "INTERRUPTED"
        stderr = [line for line in proc.stderr.read().splitlines() if line.strip()]
        step = _checkpoint_model(run_b)["step"]
        assert stderr == [f"interrupted: run 1 stopped; its checkpoint at step {step} is kept; "
                          f"continue with `--resume 1`"]
    assert _checkpoint_model(run_b)["step"] < 120

    resumed = bench([*args, "--results-dir", str(tmp_path / "b"), "--resume", "1"], cache)
    assert resumed.returncode == 0, resumed.stderr
    assert run_dirs(tmp_path / "b") == [run_b]  # resumed in place
    assert load_json(run_b / "run.json")["status"] == "COMPLETED"
    a, b = _checkpoint_model(run_a), _checkpoint_model(run_b)
    assert a["step"] == b["step"] == 120
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert curves(run_a) == curves(run_b)
    ra, rb = load_json(run_a / "run.json")["result"], load_json(run_b / "run.json")["result"]
    for k in ("test_acc", "test_acc_ema", "test_acc_selected", "selected_step", "val_acc"):
        assert ra[k] == rb[k], k


def test_ssmae_resume_after_kill_restores_memory_and_gate_bitwise(tmp_path):
    args = ["run", "ssmae", *SMOKE, "--steps", "100", "--ckpt-every", "10", "--eval-every", "20"]
    run_a, proc, run_b = uninterrupted_then_started(args, tmp_path)
    while _checkpoint_model(run_b)["step"] < 50:  # past the gate's warm-up and first admissions
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    kill(proc)
    killed = _checkpoint_model(run_b)
    assert killed["step"] < 100
    assert killed["method"]["gate"]["is_open"] and (killed["method"]["memory"]["labels"] >= 0).any()

    resumed = bench([*args, "--results-dir", str(tmp_path / "b"), "--resume", "1"], tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _checkpoint_model(run_a), _checkpoint_model(run_b)
    assert torch.equal(a["method"]["memory"]["labels"], b["method"]["memory"]["labels"])
    assert a["method"]["gate"] == b["method"]["gate"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert curves(run_a) == curves(run_b)


def test_resume_with_a_different_config_is_refused(tmp_path):
    cache, results = tmp_path / "cache", tmp_path / "results"
    args = ["run", "supervised", *SMOKE, "--steps", "40", "--ckpt-every", "20", "--results-dir", str(results)]
    proc = start_bench(args, cache)
    wait_for(results / "runs" / "1" / "checkpoint.pt", proc)
    kill(proc)
    before = sorted(p.name for p in (results / "runs" / "1").iterdir())
    out = bench([*args[:-2], "--lr", "0.5", "--results-dir", str(results), "--resume", "1"], cache)
    assert out.returncode == 2
    assert "cannot resume run 1" in out.stderr and "lr" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (results / "runs" / "1").iterdir()) == before
    assert run_dirs(results) == [results / "runs" / "1"]


@pytest.mark.parametrize("args, message", [
    (["run", "nope"], "unknown method 'nope'"),
    (["run", "supervised", "--preset", "huge"], "unknown preset 'huge'"),
    (["run", "supervised", "--dataset", "mnist"], "not one of"),
    (["run", "supervised", "--label-fraction", "0"], "out of range"),
    (["run", "supervised", "--label-fraction", "1.5"], "out of range"),
    (["run", "supervised", "--dataset", "synthetic", "--labels-per-class", "500"], "more than class"),
    (["run", "supervised", "--steps", "abc"], "not a valid int"),
    (["run", "supervised", "--no-such-flag", "1"], "unrecognized arguments"),
    (["run", "supervised", "--dataset", "imagefolder"], "needs --data"),
    (["run", "supervised", "--dataset", "imagefolder", "--data", "/does/not/exist"], "/does/not/exist"),
    (["run", "supervised", "--resume", "7"], "--resume 7"),
    (["frobnicate"], "unknown command"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, args, message):
    results = tmp_path / "results"
    code, lines, err = run_cli([*args, "--results-dir", str(results)] if args[0] == "run" and len(args) > 1 else args,
                               tmp_path, capsys, monkeypatch)
    assert_rejected(code, lines, err, message, results)
    assert not results.exists()


def test_list_shows_methods_datasets_presets(tmp_path):
    out = bench(["list"], tmp_path)
    assert out.returncode == 0
    for word in ("supervised", "fixmatch", "semi_mae", "ssmae", "semi_vit", "mae_finetune",
                 "cifar10", "cifar100", "imagefolder", "synthetic", "smoke", "fast", "paper"):
        assert word in out.stdout


COMMAND_HELP = [["--help"], ["run", "--help"], ["run", "supervised", "--help"], ["list", "--help"],
                ["study", "--help"], ["report", "--help"], ["tune", "--help"], ["speed", "--help"]]


def undocumented(help_text: str) -> list[str]:
    """Arguments that argparse lists without a description (on their line or the next)."""
    lines = help_text.splitlines()
    bare = []
    for i, line in enumerate(lines):
        if re.match(r"^  \S", line) and len(re.split(r"\s{2,}", line.strip(), maxsplit=1)) == 1:
            if not (i + 1 < len(lines) and re.match(r"^\s{16,}\S", lines[i + 1])):
                bare.append(line.strip())
    return bare


@pytest.mark.parametrize("args", COMMAND_HELP, ids=" ".join)
def test_help_on_every_command_explains_every_argument(capsys, args):
    from bench.cli import main
    try:
        code = main(args)
    except SystemExit as done:  # argparse's --help exits
        code = done.code
    out = capsys.readouterr().out
    assert code in (0, None) and "usage" in out.lower(), args
    assert undocumented(out) == [], out


@pytest.mark.skipif(not SHARED_CIFAR10.exists(), reason="real CIFAR-10 copy not present")
def test_smoke_run_on_real_cifar10(tmp_path, real_cache):
    out = bench(["run", "supervised", "--dataset", "cifar10", "--data", str(SHARED_CIFAR10), "--preset", "smoke",
                 "--no-progress", "--results-dir", str(tmp_path / "r")], real_cache, timeout=600)
    assert out.returncode == 0, out.stderr
    (run,) = run_dirs(tmp_path / "r")
    result = load_json(run / "run.json")["result"]
    assert load_json(run / "run.json")["status"] == "COMPLETED"
    # the reported accuracy is the final model's on the 10,000 real test images, above chance
    import torch
    from bench.train import checkpoint
    from bench.data.sources import load_dataset
    from bench.method.evaluate import evaluate
    from bench.model.vit_mae import build_model
    from bench.data.randomness import StepRandom
    from bench.method.views import Views
    cfg = load_json(run / "config.json")
    data = load_dataset("cifar10", str(SHARED_CIFAR10), real_cache)
    model = build_model(cfg, 10, with_decoder=False)
    model.load_state_dict(checkpoint.load(run / "checkpoint.pt")["model"])
    acc = evaluate(model, torch.from_numpy(data.test_x), torch.arange(len(data.test_y)), torch.from_numpy(data.test_y),
                   Views(cfg["img_size"], StepRandom(0)).eval, 1000, lambda: torch.autocast("cpu", enabled=False)).acc
    assert len(data.test_y) == 10_000 and acc == pytest.approx(result["test_acc"]) and acc > 15
