"""Recipes that let every method do what it is named for, and configs that cannot work rejected
as bad input (one line, exit 2, nothing written) by `bench run`, `bench study` and `bench tune`."""
import numpy as np
import pytest

from bench.config import preset_names, resolve
from bench.method.base import get_method
from bench.method.pseudo import confidence_cap
from bench.data.splits import make_split
from helpers import assert_rejected, run_cli

PSEUDO_LABELLING = ["fixmatch", "semi_mae", "ssmae", "semi_vit"]
CIFAR10_SPLIT = make_split(np.repeat(np.arange(10), 5000), 10, label_fraction=0.1, seed=0)


@pytest.mark.parametrize("preset", preset_names())
@pytest.mark.parametrize("method", PSEUDO_LABELLING)
def test_every_shipped_preset_lets_every_method_admit_pseudo_labels(preset, method):
    cls = get_method(method)
    cfg = resolve(cls, preset=preset, cli={"dataset": "cifar10"})
    cls.check(cfg, 10, CIFAR10_SPLIT)  # raises where pseudo-labelling cannot happen
    threshold = cfg.get("tau", cfg.get("confidence"))
    assert confidence_cap(cfg["label_smoothing"], 100) > threshold  # CIFAR-100 too


@pytest.mark.parametrize("preset", preset_names())
def test_ssmae_keeps_its_papers_labeled_share_in_every_preset(preset):
    # 32 unlabeled images per 16 labeled: labeled images are a third of its single CE
    assert resolve(get_method("ssmae"), preset=preset, cli={"dataset": "cifar10"})["mu"] == 2


def test_method_recipes_sit_between_core_defaults_and_presets(tmp_path):
    assert resolve(get_method("fixmatch"))["label_smoothing"] == 0.0
    assert resolve(get_method("semi_vit"))["label_smoothing"] == 0.1
    assert resolve(get_method("mae_finetune"))["layer_decay"] == 0.65
    preset = tmp_path / "p.yaml"
    preset.write_text("label_smoothing: 0.05\n")
    assert resolve(get_method("semi_vit"), preset=str(preset))["label_smoothing"] == 0.05


CANNOT_WORK = {
    "smoothing caps FixMatch below tau": (["fixmatch", "--label-smoothing", "0.1"],
                                          "fixmatch: --label-smoothing 0.1 caps confidence at 0.910 on 10 classes, not above --tau 0.95"),
    "smoothing caps Semi-MAE below tau": (["semi_mae", "--label-smoothing", "0.1", "--tau", "0.95"],
                                          "lower --label-smoothing below 0.0556 or lower --tau below 0.910"),
    "smoothing caps SSMAE at its confidence": (["ssmae", "--label-smoothing", "0.1", "--confidence", "0.91"],
                                               "not above --confidence 0.91"),
    "gate read after the last step": (["ssmae", "--gate-warmup-steps", "60"], "the gate is first read at step 60"),
    "gate cadence past the end": (["ssmae", "--gate-warmup-steps", "50", "--eval-every", "30"],
                                  "the gate is first read at step 60"),
    "gate needs more images than validation holds": (["ssmae", "--gate-min-confident", "11"],
                                                     "holds only 10"),
    "no unlabeled pool": (["fixmatch", "--unlabeled-pool", "rest", "--label-fraction", "1.0"],
                          "the unlabeled pool is empty"),
    "no unlabeled image per step": (["fixmatch", "--mu", "0.01"], "rounds to no unlabeled image per step"),
}


@pytest.mark.parametrize("case", CANNOT_WORK)
def test_a_run_that_cannot_pseudo_label_is_bad_input(tmp_path, capsys, monkeypatch, case):
    args, words = CANNOT_WORK[case]
    results = tmp_path / "results"
    code, lines, err = run_cli(["run", args[0], "--preset", "smoke", "--no-progress", *args[1:],
                                "--results-dir", str(results)], tmp_path, capsys, monkeypatch)
    assert_rejected(code, lines, err, words, results)


def test_a_study_with_one_impossible_cell_is_rejected_before_any_run(tmp_path, capsys, monkeypatch):
    study = tmp_path / "s.yaml"
    study.write_text("methods: [supervised, fixmatch]\naxes:\n  label_smoothing: {values: [0.0, 0.2]}\nseeds: 1\n")
    results = tmp_path / "results"
    code, lines, err = run_cli(["study", str(study), "--dataset", "synthetic", "--preset", "smoke",
                                "--results-dir", str(results)], tmp_path, capsys, monkeypatch)
    assert_rejected(code, lines, err, "cell fixmatch|label_smoothing=0.2|seed=0: fixmatch: --label-smoothing 0.2",
                    results)


def test_a_tune_space_that_reaches_impossible_configs_is_rejected(tmp_path, capsys, monkeypatch):
    space = tmp_path / "space.yaml"
    space.write_text("tau: {low: 0.5, high: 0.95}\nlabel_smoothing: {low: 0.0, high: 0.2}\n")
    results = tmp_path / "results"
    code, lines, err = run_cli(["tune", "fixmatch", "--preset", "smoke", "--space", str(space), "--trials", "1",
                                "--results-dir", str(results)], tmp_path, capsys, monkeypatch)
    assert_rejected(code, lines, err, "the search space reaches configs that cannot work (tau=0.95, "
                    "label_smoothing=0.2)", results)


def cfg_of(method, preset):
    sources = {}
    return resolve(get_method(method), preset=preset, sources=sources), sources


def test_the_paper_preset_runs_each_row_as_the_papers_code_ran_it():
    for method in ("supervised", "mae_finetune"):  # finetune.py: batch 32, AdamW 1e-4, cosine, 100 epochs
        cfg, _ = cfg_of(method, "paper")
        assert (cfg["batch_size"], cfg["lr"], cfg["schedule"], cfg["min_lr"], cfg["warmup_steps"]) == \
            (32, 1e-4, "cosine", 0.0, 0)
        assert cfg["steps"] == 100 * (4500 // 32)          # 100 epochs of 4,500 training labels
        assert cfg["layer_decay"] == 1.0 and cfg["label_smoothing"] == 0.0 and cfg["mixup_alpha"] == 0.0
    ssmae, _ = cfg_of("ssmae", "paper")                    # main.py: 16 + 32 images, constant 1e-4, 400 epochs
    assert (ssmae["batch_size"], ssmae["mu"], ssmae["lr"], ssmae["schedule"], ssmae["steps"]) == \
        (16, 2, 1e-4, "constant", 400 * 312)
    semi_vit, _ = cfg_of("semi_vit", "paper")              # its own recipe, not SSMAE's optimiser
    assert (semi_vit["schedule"], semi_vit["mu"], semi_vit["tau"], semi_vit["layer_decay"]) == ("cosine", 5, 0.5, 0.75)
    assert semi_vit["warmup_steps"] > 0 and semi_vit["lr"] == pytest.approx(1e-3 * 16 / 256)


def test_cpu_preset_overrides_of_a_method_recipe_are_flagged_where_they_apply():
    cfg, sources = cfg_of("supervised", "cpu")
    assert cfg["label_smoothing"] == 0.0 and "overrides supervised's recipe: 0.1" in sources["label_smoothing"]
    for method, decay in (("mae_finetune", 0.65), ("semi_vit", 0.75)):  # layer decay stays the method's own
        cfg, sources = cfg_of(method, "cpu")
        assert cfg["layer_decay"] == decay and "recipe" in sources["layer_decay"], method
    for method in PSEUDO_LABELLING:                        # 32 + 64 images per step, as its comment says
        cfg, _ = cfg_of(method, "cpu")
        assert (cfg["batch_size"], cfg["mu"]) == (32, 2), method
    fix, _ = cfg_of("fixmatch", "cpu")
    assert fix["tau"] == 0.7


def test_fast_preset_thresholds_are_the_measured_ones():
    for method, key in (("fixmatch", "tau"), ("semi_mae", "tau"), ("ssmae", "confidence")):
        assert cfg_of(method, "fast")[0][key] == 0.7, method
    assert cfg_of("semi_vit", "fast")[0]["tau"] == 0.5 == get_method("semi_vit").options["tau"].default
