"""Reports state every budget and give differences with their uncertainty, paired by seed."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.study.compare import differences, interval, p_value, paired_power, seeds_needed
from bench.study.spec import StudySpec
from helpers import bench, load_json, run_dirs

FAST = ["--preset", "smoke", "--no-progress", "--set", "steps=20", "--set", "eval_every=10",
        "--set", "ckpt_every=10", "--set", "log_every=5"]


def test_t_interval_and_seeds_needed_by_hand():
    mean, low, high = interval([1.0, 2.0, 3.0])
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)   # sd of 1, 2, 3 is 1
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert math.isnan(interval([0.5])[1])               # one pair: no interval
    # a difference of 1 at spread 1: 80 % power takes 10 pairs (G*Power's table: 0.803 at n = 10),
    # not the 7 at which the interval only just excludes zero at the observed mean
    assert seeds_needed(1.0, 1.0) == 10 and seeds_needed(-2.0, 2.0) == 10
    assert paired_power(1.0, 10) == pytest.approx(0.8031, abs=5e-4) and paired_power(1.0, 9) < 0.8
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(0.001, 5.0) is None


def test_power_is_the_share_of_simulated_paired_tests_that_reject():
    rng = np.random.default_rng(0)
    diffs = rng.normal(0.8, 1.0, size=(20000, 8))
    rejected = stats.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05
    assert rejected.mean() == pytest.approx(paired_power(0.8, 8), abs=0.01)


def test_each_method_meets_its_control_its_oracle_its_own_run_and_holm_adjusts_within_a_family():
    """Three families: against the reference method, each method's run against its own control
    (the primary tested alone, the others Holm-adjusted together), the oracle against its method's
    run; no row of one family enters another's adjustment."""
    semi = ["fixmatch", "semi_mae", "flexmatch"]
    spec = StudySpec(name="pc", path=Path("pc.yaml"), methods=["mae_finetune", *semi], metric="test_acc",
                     axes={"labels_per_class": {"values": [25]}}, compare_to="mae_finetune",
                     references={"control": semi, "oracle": semi},
                     primary={"method": "fixmatch", "against": "control", "labels_per_class": 25})
    rng = np.random.default_rng(0)
    acc = {}
    for cell in spec.cells(3):
        shift = {None: 3.0, "control": 0.0, "oracle": 8.0}[cell.variant] * (cell.method != "mae_finetune")
        acc[cell] = 40.0 + shift + rng.normal(0, 1)
    runs = pd.DataFrame([{"group": c.group, "method": c.method, "variant": c.variant, "seed": c.seed,
                          "labels_per_class": 25, "test_acc": v} for c, v in acc.items()])
    rows = differences(runs, spec)

    def paired(method, variant, ref_method, ref_variant):
        return [acc[next(c for c in acc if (c.method, c.variant, c.seed) == (method, variant, s))]
                - acc[next(c for c in acc if (c.method, c.variant, c.seed) == (ref_method, ref_variant, s))]
                for s in range(3)]

    def row(method, variant, reference):
        (r,) = rows[(rows["method"] == method) & (rows["variant"].fillna("") == (variant or ""))
                    & (rows["reference"] == reference)].to_dict("records")
        return r

    assert set(rows["reference"]) == {"method mae_finetune", "variant control", "variant main"}
    assert len(rows[rows["reference"] == "variant control"]) == 3      # main runs only, never the oracle
    assert len(rows[rows["reference"] == "variant main"]) == 3         # the oracles only
    assert len(rows[rows["reference"] == "method mae_finetune"]) == 9  # every run, control and oracle too
    for method in semi:
        oracle = row(method, "oracle", "variant main")
        assert oracle["diff"] == pytest.approx(np.mean(paired(method, "oracle", method, None)))
        gain = row(method, None, "variant control")
        assert gain["diff"] == pytest.approx(np.mean(paired(method, None, method, "control")))
    primary = row("fixmatch", None, "variant control")
    assert primary["primary"] and primary["p_holm"] == primary["p_value"]   # tested alone
    ps = sorted(p_value(paired(m, None, m, "control")) for m in ("semi_mae", "flexmatch"))
    holm = {ps[0]: 2 * ps[0], ps[1]: max(2 * ps[0], ps[1])}                # Holm's step-down, by hand
    for method in ("semi_mae", "flexmatch"):
        r = row(method, None, "variant control")
        assert not r["primary"] and r["p_holm"] == pytest.approx(min(1.0, holm[r["p_value"]]))
    smallest = min(p_value(paired(m, "oracle", m, None)) for m in semi)
    assert min(rows[rows["reference"] == "variant main"]["p_holm"]) == pytest.approx(min(1.0, 3 * smallest))


def test_a_study_report_states_budgets_and_paired_differences(tmp_path):
    study, results = tmp_path / "pair.yaml", tmp_path / "results"
    study.write_text("""
description: two methods, two seeds
methods: [supervised, fixmatch]
budget: every method trains the same 20 optimizer steps
seeds: 2
metric: test_acc
""")
    out = bench(["study", str(study), "--dataset", "synthetic", *FAST, "--results-dir", str(results),
                 "--report-dir", str(tmp_path / "published")], tmp_path / "cache", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = tmp_path / "published" / "pair" / "synthetic-smoke"   # each study keeps its own folder
    text = (report / "table.md").read_text()
    assert "Budget: every method trains the same 20 optimizer steps" in text
    table = pd.read_csv(report / "table.csv", index_col=0)
    for column in ("steps (stages + own)", "labeled images (k)", "unlabeled images (k)", "forward images (k)",
                   "validation images"):
        assert column in table.columns, column
    runs = {(load_json(r / "config.json")["method"], load_json(r / "config.json")["seed"]):
            load_json(r / "run.json")["result"] for r in run_dirs(results)}
    assert runs[("fixmatch", 0)]["budget"] == {"steps": 20, "labeled_images": 20 * 32, "unlabeled_images": 20 * 64,
                                               "forward_images": 20 * (32 + 2 * 64)}
    assert str(table.loc["fixmatch", "steps (stages + own)"]) == "20"
    val = {len(load_json(r / "split.json")["val"]) for r in run_dirs(results)}   # selection read these
    assert len(val) == 1
    n_val = val.pop()
    assert str(table.loc["fixmatch", "validation images"]) == f"{n_val:,}"
    # how far apart two validation readings must be to mean anything at that size
    p = sum(runs[("fixmatch", s)]["selected_val_acc"] for s in (0, 1)) / 200
    half = 196 * math.sqrt(p * (1 - p) / n_val)
    assert float(table.loc["fixmatch", "validation ± (95 %)"]) == pytest.approx(half, abs=0.051)
    # the difference to supervised, paired by seed, with its t-interval
    diffs = pd.read_csv(report / "differences.csv")
    (row,) = diffs.to_dict("records")
    paired = [runs[("fixmatch", s)]["test_acc"] - runs[("supervised", s)]["test_acc"] for s in (0, 1)]
    mean, low, high = interval(paired)
    assert row["method"] == "fixmatch" and row["reference"] == "method supervised" and row["n_pairs"] == 2
    assert (row["diff"], row["ci_low"], row["ci_high"]) == pytest.approx((mean, low, high))
    assert "Differences to method supervised" in text and f"{mean:+.2f}" in text


def test_an_axis_study_compares_each_value_with_its_reference_value_paired_by_seed(tmp_path):
    study, results = tmp_path / "lr.yaml", tmp_path / "results"
    study.write_text("methods: [supervised]\naxes: {lr: {values: [0.001, 0.003]}}\ncompare_to: {lr: 0.003}\n"
                     "seeds: 2\nmetric: test_acc\n")
    out = bench(["study", str(study), "--dataset", "synthetic", *FAST, "--results-dir", str(results),
                 "--report-dir", str(tmp_path / "published")], tmp_path / "cache", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    acc = {(load_json(r / "config.json")["lr"], load_json(r / "config.json")["seed"]):
           load_json(r / "run.json")["result"]["test_acc"] for r in run_dirs(results)}
    (row,) = pd.read_csv(tmp_path / "published" / "lr" / "synthetic-smoke" / "differences.csv").to_dict("records")
    mean, low, high = interval([acc[0.001, s] - acc[0.003, s] for s in (0, 1)])
    assert row["lr"] == 0.001 and row["reference"] == "lr 0.003" and row["n_pairs"] == 2
    assert (row["diff"], row["ci_low"], row["ci_high"]) == pytest.approx((mean, low, high), nan_ok=True)


def test_a_budget_lists_the_stages_in_pipeline_order():
    from bench.study.report import budget_of
    own = {"steps": 2000, "labeled_images": 64000, "unlabeled_images": 128000, "forward_images": 300000}
    pretrain = {"steps": 6000, "labeled_images": 0, "unlabeled_images": 1536000, "forward_images": 400000}
    finetune = {"steps": 500, "labeled_images": 16000, "unlabeled_images": 0, "forward_images": 16000}
    listed = {"budget": own, "stages": [{"name": "pretrain", "budget": pretrain}, {"name": "finetune", "budget": finetune}]}
    keyed = {"budget": own, "stages": {"finetune": {"budget": finetune}, "pretrain": {"budget": pretrain}}}
    for result in (listed, keyed):  # a record whose JSON sorted the stage names keeps the pipeline's order
        b = budget_of(result, "semi_vit")
        assert b["steps"] == "6000 + 500 + 2000"
        assert (b["labeled_images"], b["unlabeled_images"], b["forward_images"]) == (80000, 1664000, 716000)
