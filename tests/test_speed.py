"""`bench speed`: per-method throughput on CPU, suites with reference figures and targets,
operator profiles, and the verdict against a target."""
import json

import pytest

from bench.speed import Workload, verdict
from helpers import assert_rejected, bench, run_cli


def test_speed_runs_on_cpu_and_writes_its_table(tmp_path):
    out = bench(["speed", "--methods", "supervised", "fixmatch", "--steps", "2", "--warmup", "1",
                 "--results-dir", str(tmp_path)], tmp_path / "c", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "speed" / "speed-smoke-cpu.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["supervised", "fixmatch"]
    # the smoke preset's step: 32 labeled images; FixMatch adds mu 2 x 32 unlabeled ones
    assert [r["images_per_step"] for r in rows] == [32, 96]
    for r in rows:  # every rate is its step's figure over the step's time
        assert r["img_per_s"] == pytest.approx(r["images_per_step"] / (r["step_ms"] / 1000))
        assert r["tflop_per_s"] == pytest.approx(r["tflop_per_step"] / (r["step_ms"] / 1000))
    # FixMatch's step runs the model on 3x the images (and a teacher pass): more than twice the FLOPs
    assert rows[1]["tflop_per_step"] > 2 * rows[0]["tflop_per_step"]
    assert "CPU figures" in out.stdout


def test_a_suite_measures_its_workloads_beside_their_references(tmp_path):
    suite = tmp_path / "mini.yaml"
    suite.write_text("""
views_pct_max: 90
workloads:
  - {name: small-batch, method: supervised, preset: smoke, set: {batch_size: 8},
     reference: {img_per_s: 10, source: a paper}, target: {img_per_s: 1}}
  - {name: ssmae-smoke, method: ssmae, preset: smoke}
""")
    out = bench(["speed", "--suite", str(suite), "--steps", "2", "--warmup", "1", "--profile", "1",
                 "--results-dir", str(tmp_path)], tmp_path / "c", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    saved = json.loads((tmp_path / "speed" / "speed-mini-cpu.json").read_text())
    small, ssmae = saved["rows"]
    assert (small["workload"], small["images_per_step"]) == ("small-batch", 8)  # the suite's override
    assert small["reference_img_per_s"] == 10 and small["target_img_per_s"] == 1
    assert small["verdict"] == ssmae["verdict"] == "n/a on CPU"  # GPU targets are not judged on a CPU
    assert ssmae["images_per_step"] > 32  # labeled + unlabeled images
    assert "CPU figures" in out.stdout
    for name in ("small-batch", "ssmae-smoke"):  # where the step's time goes, by operator
        profile = (tmp_path / "speed" / f"profile-mini-{name}-cpu.txt").read_text()
        assert "self_cpu_time_total" in profile and "aten::addmm" in profile


def test_verdict_against_targets_on_a_gpu():
    wl = Workload("w", "supervised", "fast", target={"img_per_s": 3600, "mfu_pct": 40})
    row = {"img_per_s": 3700.0, "mfu_pct": 41.0, "views_pct": 4.0}
    assert verdict(row, wl, 10, on_gpu=True) == "met"
    assert verdict({**row, "mfu_pct": 38.0}, wl, 10, on_gpu=True) == "MISSED: mfu_pct 38 < 40"
    assert verdict({**row, "views_pct": 12.5}, wl, 10, on_gpu=True) == "MISSED: views 12.5% > 10%"
    assert verdict(row, wl, 10, on_gpu=False) == "n/a on CPU"
    assert verdict(row, Workload("w", "supervised", "fast"), None, on_gpu=True) == ""


@pytest.mark.parametrize("text, words", [
    ("workloads: []", "non-empty 'workloads'"),
    ("workloads: [{method: fixmatc}]", "unknown method 'fixmatc'"),
    ("workloads: [{method: supervised, target: {fps: 3}}]", "not ['fps']"),
    ("workloads: [{method: supervised, set: {lr: -1}}]", "--lr: -1"),
    ("workloads: [{method: supervised, target: {img_per_s: '2000'}}]", "target img_per_s must be a number > 0"),
    ("peak_tflops: 0\nworkloads: [{method: supervised}]", "peak_tflops must be a number > 0"),
])
def test_bad_suite_files_are_rejected(tmp_path, capsys, monkeypatch, text, words):
    suite = tmp_path / "bad.yaml"
    suite.write_text(text)
    results = tmp_path / "r"
    code, lines, err = run_cli(["speed", "--suite", str(suite), "--results-dir", str(results)], tmp_path, capsys,
                               monkeypatch)
    assert_rejected(code, lines, err, words, results)
    assert not results.exists()


def test_suite_and_preset_are_exclusive(tmp_path, capsys, monkeypatch):
    code, lines, err = run_cli(["speed", "--suite", "targets", "--preset", "fast", "--results-dir", str(tmp_path / "r")],
                               tmp_path, capsys, monkeypatch)
    assert_rejected(code, lines, err, "drop --methods / --preset", tmp_path / "r")


def test_allreduce_speed_measures_the_gradient_sync_on_two_processes():
    from bench.distributed.bandwidth import gradient_elements, measure
    assert 86e6 < gradient_elements("vit_base_patch16_224") < 87e6        # ViT-B/16: 86.6 M parameters
    rows = measure([1_000, 250_000], world=2, repeats=3)
    assert [r["elements"] for r in rows] == [1_000, 250_000] and {r["backend"] for r in rows} == {"gloo"}
    for r in rows:
        assert r["ms"] > 0 and r["mbytes"] == 4 * r["elements"] / 1e6
        assert r["bus_gb_s"] == pytest.approx(r["alg_gb_s"])              # 2 (K - 1) / K = 1 at K = 2


def test_a_streamed_store_workload_reports_the_stores_read_rate_beside_the_step(tmp_path):
    out = bench(["speed", "--methods", "supervised", "--steps", "3", "--warmup", "1", "--set", "store=streamed",
                 "--set", "image_side=96", "--results-dir", str(tmp_path)], tmp_path / "c", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = json.loads((tmp_path / "speed" / "speed-smoke-cpu.json").read_text())["rows"]
    assert row["store"] == "streamed"
    resident = bench(["speed", "--methods", "supervised", "--steps", "1", "--warmup", "1", "--set", "store=resident",
                      "--set", "image_side=96", "--results-dir", str(tmp_path / "r")], tmp_path / "c", timeout=600)
    assert resident.returncode == 0, resident.stderr[-2000:]
    (same,) = json.loads((tmp_path / "r" / "speed" / "speed-smoke-cpu.json").read_text())["rows"]
    # the store changes where the images come from, not the step it feeds
    assert same["store"] == "resident" and same["tflop_per_step"] == row["tflop_per_step"]
    assert same["images_per_step"] == row["images_per_step"]
    wl = Workload("w", "semi_vit", None, target={"img_per_s": 1})
    starved = {**row, "device_type": "cuda", "img_per_s": 2, "mfu_pct": 1, "views_pct": 4, "store_wait_pct": 7}
    assert verdict(starved, wl, 10, on_gpu=True) == "MISSED: views + store wait 11.0% > 10%"
    assert verdict({**starved, "store_wait_pct": 5}, wl, 10, on_gpu=True) == "met"
