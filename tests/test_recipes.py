"""Recipes that let every method do what it is named for, and configs that cannot work rejected
as bad input (one line, exit 2, nothing written) by `bench run`, `bench study` and `bench tune`."""
import numpy as np
import pytest

from bench.config import preset_names, resolve
from bench.method import get_method
from bench.pseudo import confidence_cap
from bench.splits import make_split
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
    assert resolve(get_method("ssmae"), preset=preset)["mu"] == 2


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
