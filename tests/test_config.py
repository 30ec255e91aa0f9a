import pytest

from bench.config import resolve
from bench.errors import UsageError
from bench.method.base import get_method


def sup():
    return get_method("supervised")


def test_precedence_defaults_preset_cli():
    base = resolve(sup())
    assert base["steps"] == 5000 and base["preset"] is None
    smoke = resolve(sup(), preset="smoke")
    assert smoke["steps"] == 60 and smoke["depth"] == 2
    both = resolve(sup(), preset="smoke", cli={"steps": "70", "lr": "0.01"})
    assert both["steps"] == 70 and both["lr"] == 0.01 and both["depth"] == 2


def test_study_layer_sits_between_preset_and_cli():
    cfg = resolve(sup(), preset="smoke", study={"steps": 11, "lr": 0.5}, cli={"lr": "0.25"})
    assert cfg["steps"] == 11 and cfg["lr"] == 0.25


def test_preset_file_and_per_method_section(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("steps: 9\nmethods:\n  supervised:\n    lr: 0.123\n  other:\n    tau: 0.5\n")
    cfg = resolve(sup(), preset=str(p))
    assert cfg["steps"] == 9 and cfg["lr"] == 0.123 and cfg["preset"] == str(p)


@pytest.mark.parametrize("cli, message", [
    ({"label_fraction": "0"}, "label-fraction: 0.0 is out of range"),
    ({"label_fraction": "1.5"}, "in \\(0, 1\\]"),
    ({"steps": "ten"}, "not a valid int"),
    ({"steps": "2.5"}, "not a valid int"),
    ({"dataset": "mnist"}, "not one of"),
    ({"bogus": 1}, "unknown option 'bogus'"),
    ({"img_size": "30", "patch_size": "4"}, "not divisible"),
    ({"dataset": "imagefolder"}, "needs --data"),
])
def test_invalid_values_are_rejected(cli, message):
    with pytest.raises(UsageError, match=message):
        resolve(sup(), cli=cli)


def test_unknown_preset_and_method():
    with pytest.raises(UsageError, match="unknown preset 'huge'"):
        resolve(sup(), preset="huge")
    with pytest.raises(UsageError, match="unknown method 'nope'"):
        get_method("nope")


def test_malformed_preset_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("steps: [1, 2\n")
    with pytest.raises(UsageError, match="cannot read preset"):
        resolve(sup(), preset=str(p))


def test_set_method_key_reaches_that_method_only():
    from bench.cli import parse_sets
    from bench.config import resolve
    from bench.method.base import get_method
    layer = parse_sets(["steps=30", "semi_vit.finetune_steps=7", "fixmatch.tau=0.4"])
    assert layer == {"steps": 30, "methods": {"semi_vit": {"finetune_steps": 7}, "fixmatch": {"tau": 0.4}}}
    vit = resolve(get_method("semi_vit"), preset="smoke", cli=layer)
    fix = resolve(get_method("fixmatch"), preset="smoke", cli=layer)
    assert (vit["steps"], vit["finetune_steps"], vit["tau"]) == (30, 7, 0.5)
    assert (fix["steps"], fix["tau"]) == (30, 0.4)


def test_a_study_cut_to_some_variants_keeps_their_cells():
    from bench.study.spec import load_study
    spec = load_study("ssmae_ablation").cut(variants=["full", "no_gate"])
    assert list(spec.variants) == ["full", "no_gate"]
    assert {c.key for c in spec.cells(1)} <= {c.key for c in load_study("ssmae_ablation").cells(1)}
    with pytest.raises(UsageError, match="--variants nope: not a variant or reference of study ssmae_ablation"):
        load_study("ssmae_ablation").cut(variants=["nope"])


def test_a_study_cut_to_some_seeds_runs_those_seeds_of_the_same_cells():
    from bench.study.spec import load_study, parse_values
    full = load_study("benchmark")
    spec = full.cut(["fixmatch", "ssmae"], parse_values(["seed=1,2"]))
    assert sorted((c.method, c.seed) for c in spec.cells()) == [("fixmatch", 1), ("fixmatch", 2), ("ssmae", 1),
                                                                ("ssmae", 2)]
    assert {c.key for c in spec.cells()} <= {c.key for c in full.cells(3)}   # a full run reuses them
    for bad in ("seed=-1", "seed=x", "seed=0.5"):
        with pytest.raises(UsageError, match="seeds are integers >= 0"):
            full.cut(values=parse_values([bad]))
