"""The plan a study prints before it runs (and alone with --plan): its grid, shared stages, what
is recorded and its time on this device, from the models' FLOPs and a measured rate."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.config import resolve
from bench.data.sources import make_synthetic
from bench.data.splits import make_split
from bench.method.base import get_method, method_names
from bench.study.plan import (auto_preset, built_stages, device_rate, forward_flops, identity_of, rate_file,
                              step_flops)
from bench.train.trainer import Trainer
from helpers import bench


@pytest.mark.parametrize("method", [m for m in method_names() if get_method(m).own_training])
def test_a_step_costs_what_torch_counts(method, tmp_path):
    """Each method's declared passes (Method.step_passes) against torch's FLOP counter on one real
    step (fused attention, which the counter leaves out, left out of ours too)."""
    cls = get_method(method)
    cfg = resolve(cls, preset="smoke", cli={"progress": False})
    data = make_synthetic(classes=4, size=32, train_per_class=64, test_per_class=4)
    trainer = Trainer(cfg, cls, data, make_split(data.train_y, 4, label_fraction=0.5, seed=0), tmp_path)
    trainer.method.steady_state()  # e.g. SSMAE's gate open: the step that dominates a run
    trainer.train_step()
    with FlopCounterMode(display=False) as counter:
        trainer.train_step()
    assert step_flops(cfg, cls, 4, attention=False) == pytest.approx(counter.get_total_flops(), rel=0.03)


def test_attention_and_masking_in_the_forward_count():
    cfg = resolve(get_method("mae_pretrain"), preset="smoke")
    tokens, width, depth = (32 // 8) ** 2 + 1, 64, 2
    assert forward_flops(cfg, 4) - forward_flops(cfg, 4, attention=False) == 4 * tokens ** 2 * width * depth
    assert forward_flops(cfg, 4, mask_ratio=0.75) < forward_flops(cfg, 4, mask_ratio=0.25)


def test_the_rate_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rate, label, path, measured = device_rate(torch.device("cpu"))
    assert measured and path == rate_file() == tmp_path / "ssvit-bench" / "throughput.json" and rate > 1e8
    again = device_rate(torch.device("cpu"))
    assert again[:3] == (rate, label, path) and not again[3]


def test_the_preset_a_study_without_one_runs():
    assert auto_preset("local", {})[0] == ("fast" if torch.cuda.is_available() else "cpu")
    assert auto_preset("slurm", {"gpus_per_node": "8"})[0] == "fast"  # a CPU login node submitting GPU workers
    assert auto_preset("slurm", {"partition": "cpu"})[0] == "cpu"


def test_plan_prints_the_grid_writes_nothing_and_needs_no_data(tmp_path):
    study, results = tmp_path / "grid.yaml", tmp_path / "results"
    study.write_text("description: a grid\nmethods: [supervised, fixmatch]\naxes: {lr: {values: [0.001, 0.002]}}\n"
                     "seeds: 2\nmetric: test_acc\n")
    out = bench(["study", str(study), "--dataset", "cifar10", "--data", str(tmp_path / "not-here.tar.gz"),
                 "--plan", "--results-dir", str(results)], tmp_path / "cache", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "at preset cpu (chosen for this CPU: no --preset given)" in text or torch.cuda.is_available()
    assert "cells: 8 = 4 supervised + 4 fixmatch (2 seeds x 2 lr)" in text
    assert "recorded: 0 of 8 cells" in text and "GFLOP/s measured" in text and "throughput.json" in text
    assert "to shrink it: --methods supervised fixmatch, --values lr=0.001, --seeds 1" in text
    assert "fixmatch tau" in text
    assert not results.exists() and not (tmp_path / "cache").exists()  # nothing written, no data read


def test_a_run_study_plans_first_and_counts_what_is_recorded(tmp_path):
    study, results = tmp_path / "one.yaml", tmp_path / "results"
    study.write_text("description: one cell\nmethods: [mae_finetune]\nseeds: 1\nmetric: test_acc\n")
    args = ["study", str(study), "--dataset", "synthetic", "--preset", "smoke", "--no-progress", "--set", "steps=10",
            "--set", "pretrain_steps=5", "--results-dir", str(results)]
    first = bench(args, tmp_path / "cache", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.index("plan: study one") < first.stdout.index("cells done")
    assert "stages: 1 pretrain (mae_pretrain" in first.stdout and "recorded: 0 of 1" in first.stdout
    assert "| mae_finetune" in first.stdout  # the table, printed at the end
    again = bench([*args, "--plan"], tmp_path / "cache", cwd=tmp_path)
    assert again.returncode == 0 and "recorded: 1 of 1 cells" in again.stdout, again.stdout + again.stderr
    # the plan tells the stages already built from those still to train (a second seed's is not)
    more = bench([*args, "--plan", "--seeds", "2"], tmp_path / "cache", cwd=tmp_path)
    assert "stages: 2 pretrain (mae_pretrain, 5 steps each), shared by 2 cells from the cache; 1 already built" \
        in more.stdout, more.stdout + more.stderr
    # and before the first run, with nothing built, it claimed none
    assert "stages: 1 pretrain (mae_pretrain, 5 steps each), shared by 1 cells from the cache\n" in first.stdout


def test_a_stage_built_from_another_folder_counts_as_built(tmp_path):
    """The stage.json of a cached stage keeps --data as it was given (often relative); a plan made
    from another folder, or with the path spelled out, still finds it; another archive does not."""
    cls = get_method("mae_pretrain")
    built_cfg = resolve(cls, preset="cpu", cli={"dataset": "cifar10", "data": "../shared/data/cifar10.tar.gz"})
    stage = tmp_path / "results" / "stages" / "0123abcd"
    stage.mkdir(parents=True)
    (stage / "stage.json").write_text(json.dumps({"config": built_cfg, "result": {}}, default=str))
    (stage / "final.pt").write_bytes(b"weights")
    built = built_stages(tmp_path / "results")
    assert identity_of({**built_cfg, "data": "/work/shared/data/cifar10.tar.gz"}, cls) in built
    assert identity_of({**built_cfg, "data": "/work/shared/data/cifar10-other.tar.gz"}, cls) not in built
    assert identity_of({**built_cfg, "seed": 1}, cls) not in built


def test_tune_plans_its_trials_and_writes_nothing(tmp_path):
    results = tmp_path / "results"
    out = bench(["tune", "supervised", "--preset", "smoke", "--trials", "7", "--plan", "--results-dir", str(results)],
                tmp_path / "cache", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "plan: tune:supervised:synthetic:smoke: 7 trials, 0 already finished" in out.stdout
    assert "for the 7 left on this device" in out.stdout
    assert not results.exists() and not (tmp_path / "cache").exists()
